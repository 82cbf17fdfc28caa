"""Corral's GraphQL schema (Strawberry): types, queries, mutations, dataloaders."""
