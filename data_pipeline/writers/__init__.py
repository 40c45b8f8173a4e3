"""Writers: clean documents and exclusions as Parquet, JSON, all committed atomically."""
