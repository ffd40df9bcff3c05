"""Per-kernel durations from an ncu CSV: the last N kernels (one decode step, say), in launch order.

    ncu --clock-control none --cache-control none --csv \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size \
        .gpu/oracle speed --layers 2 --prefill 16 --decode-at 512 --steps 3 --reps 1 > ncu.csv
    python3 ci/ncu-summary.py ncu.csv 58      # 58: the kernels of one step of 2 layers

Each row: kernel, duration, DRAM bytes read and their rate, grid size. ncu runs the kernels
one at a time with its own clocks left alone (--clock-control none), so the durations are
those of a graph replay without the gaps between kernels.
"""
import collections
import csv
import sys


def main(path, last):
    header, kernels = None, collections.OrderedDict()
    for row in csv.reader(open(path)):
        if row and row[0] == "ID":
            header = row
            continue
        if header and len(row) == len(header):
            r = dict(zip(header, row))
            k = kernels.setdefault(r["ID"], {"name": r["Kernel Name"]})
            k[r["Metric Name"]] = r["Metric Value"].replace(",", "")
    total = 0.0
    for k in list(kernels.values())[-last:]:
        ns = float(k.get("gpu__time_duration.sum", 0))
        b = float(k.get("dram__bytes_read.sum", 0))
        total += ns
        rate = b / ns if ns else 0.0
        print(f"{k['name'][:40]:40s} {ns / 1e3:8.2f} us {b / 1e6:9.3f} MB {rate:8.1f} GB/s"
              f"  grid {k.get('launch__grid_size', '')}")
    print(f"total {total / 1e3:.2f} us over {min(last, len(kernels))} kernels")


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    except BrokenPipeError:  # piped into head: the rows it kept are all that was asked for
        sys.stderr.close()
