"""GraphQL: schema, resolvers and execution over the domain services (CONTRACT "GraphQL").

The schema is SDL files beside their resolvers (`catalog`, `carts`, `orders`, `users`);
`executor` is the one module that runs documents; `service.GraphQLService` is the node's
pipeline (`services.graphql`: cost and depth limits, cost bucket, persisted queries, result
cache, subscriptions), served at `/graphql` by `handlers.graphql`.
"""

from server.graphql.service import GraphQLLimits, GraphQLRequest, GraphQLService, Outcome

__all__ = ["GraphQLLimits", "GraphQLRequest", "GraphQLService", "Outcome"]
