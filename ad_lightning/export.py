"""`python -m ad_lightning.export ...`: the name export had before the deploy package; the
command is ad_lightning/deploy/export.py (same keys)."""

from ad_lightning.deploy.export import main

if __name__ == "__main__":
    main()
