"""``python -m polysae_lens``: the ``polysae-lens`` command line."""

from polysae_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
