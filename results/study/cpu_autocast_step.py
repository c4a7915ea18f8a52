"""One training step of a torchvision RetinaNet R18-FPN on the CPU: float32 against bfloat16 autocast.

The student of docs/nn.md's example (examples/torchvision_loop.py's build_student: RetinaNet,
ResNet-18, a 128-channel FPN P3-P7, BatchNorm in training mode), two generated images with 5 boxes
each, forward + backward + SGD step; the median of --steps timed steps after one warm-up step,
per precision, with --threads intra-op threads: wall time, and the process's CPU time (all its
threads), which a machine shared with other work changes less. docs/nn.md quotes what it printed.

    python results/study/cpu_autocast_step.py --size 512 --steps 3 --threads 2
"""

import argparse
import importlib.util
import os
import statistics
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=512, help="min_size = max_size of the detector's resize")
parser.add_argument("--steps", type=int, default=3, help="timed steps per precision (after one warm-up)")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "torchvision_loop.py")
spec = importlib.util.spec_from_file_location("torchvision_loop", path)
loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loop)

torch.manual_seed(0)
images = [torch.rand(3, args.size, args.size) for _ in range(2)]
corners = torch.rand(2, 5, 2) * args.size * 0.6
targets = [{"boxes": torch.cat([c, c + args.size * 0.3], dim=1), "labels": torch.randint(0, 7, (5,))} for c in corners]

for name, dtype in (("float32", None), ("bfloat16 autocast", torch.bfloat16)):
    model = loop.build_student(7, args.size, args.size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    print(f"{name}: {statistics.median(times):.2f} s per step, {statistics.median(cpu_times):.2f} CPU s "
          f"(wall: {', '.join(f'{t:.2f}' for t in times)}; CPU: {', '.join(f'{t:.2f}' for t in cpu_times)})")
