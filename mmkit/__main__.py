"""``python -m mmkit`` and ``accelerate launch -m mmkit ...``."""

from mmkit.cli import main

if __name__ == "__main__":
    main()
