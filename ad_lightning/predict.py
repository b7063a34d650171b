"""`python -m ad_lightning.predict ...`: the name predict had before the deploy package; the
command is ad_lightning/deploy/predict.py (same keys)."""

from ad_lightning.deploy.predict import main

if __name__ == "__main__":
    main()
