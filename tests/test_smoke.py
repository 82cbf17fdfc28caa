from tests.conftest import GraphQLClient


async def test_create_and_read_profile(gql: GraphQLClient) -> None:
    data = await gql(
        'mutation { createProfile(input: {name: "p1"}) { profile { id name } userErrors { message } } }'
    )
    assert data["createProfile"]["profile"]["name"] == "p1"
    data = await gql("{ profiles { edges { node { name } } totalCount } }")
    assert data["profiles"]["totalCount"] == 1
