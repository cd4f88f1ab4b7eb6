"""The smallest Kiln worker, on the kiln_worker SDK: input `text` in, upper.txt out."""
import sys
from pathlib import Path

try:
    from kiln_worker import Worker
except ImportError:  # run from a checkout without the package installed: use its source
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python/kiln-worker/src"))
    from kiln_worker import Worker


class Upper(Worker):
    def run(self, job):
        job.progress(50, stage="inference")
        job.write_text("upper.txt", job.inputs["text"].upper())


if __name__ == "__main__":
    Upper().serve()
