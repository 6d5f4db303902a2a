"""`make run`: serve --all on the tiny model, generate one image with the ensemble refiner, stop.

The one client command that runs the server side too: it imports the launcher (sdxl_services) when it runs.
"""

from __future__ import annotations

import sys

import grpc

from .client import SDXLClient
from .output import ProgressBar, save_images

PROMPT = "an astronaut riding a horse"


def run_demo(output: str = "out.png", size: tuple[int, int] = (256, 256), steps: int = 10) -> int:
    """Start every stage on a free port, generate `PROMPT` to `output`, stop them even on failure."""
    from sdxl_services import launch

    print("starting the five stage processes on the tiny model ...", file=sys.stderr)
    cluster = launch.Cluster(launch.ServeOptions(port=0, host="127.0.0.1"))
    try:
        cluster.start()
        for name, address in cluster.endpoints().items():
            print(f"{name:<13} {address}", file=sys.stderr)
        progress = ProgressBar()
        with SDXLClient(cluster.address) as client:
            result = client.generate(
                PROMPT, refiner="ensemble", num_inference_steps=steps, seed=0,
                width=size[0], height=size[1], on_progress=progress, timeout=600,
            )
        progress.end()
        paths = save_images(result.png, result.images, output)
    except launch.LaunchError as e:
        print(f"sdxl demo: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"sdxl demo: generate failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        print("stopping the stage processes ...", file=sys.stderr)
        cluster.stop()
    print(f"wrote {', '.join(str(p.resolve()) for p in paths)} (seed {result.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(*sys.argv[1:2]))
