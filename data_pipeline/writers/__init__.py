"""Writers: clean documents, exclusions and dedup results as Parquet, markers as JSON, all
committed atomically."""
