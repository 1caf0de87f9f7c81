"""``python -m ds_chunk.bench``: the sweep, a merge of earlier CSVs, or (``--worker``) one point."""

from ds_chunk.bench.cli import main

if __name__ == "__main__":
    main()
