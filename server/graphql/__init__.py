"""GraphQL: schema, resolvers and execution over the domain services (CONTRACT "GraphQL")."""
