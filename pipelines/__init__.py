"""faceaudit ingest: data set images in, Parquet shards of faces and embeddings out."""
