"""`python -m sdq ...` is the `sdq` command; under torchrun: `torchrun --nproc_per_node N -m sdq
quantize ...` quantizes across the ranks (sdq.distributed)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
