"""GraphQL resolvers: each module holds its part of the schema (the `.graphql` file beside it)
and the resolvers that call the domain services through the request context."""
