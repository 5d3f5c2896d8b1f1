"""The search logic: the catalogue (search, index, delete), bulk import, paging, caches, request rules and image
URL fetching. Knows neither gRPC nor torch."""
