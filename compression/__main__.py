"""`python -m compression bench ...` (see compression/bench.py)."""
import sys

from compression.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "bench":
        sys.exit("usage: python -m compression bench --device cpu|cuda --model tiny|gpt2-small --json [--steps N]")
    sys.exit(main(args[1:]))
