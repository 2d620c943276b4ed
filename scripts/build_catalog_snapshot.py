#!/usr/bin/env python3
"""Build cloudtune's bundled GPU price snapshot from raw SkyPilot v8 catalogs.

Input: a directory laid out like ``skypilot-catalog/catalogs/v8``, i.e. one
sub-directory per cloud holding that cloud's upstream ``vms.csv``.
Output: the same layout, reduced to GPU offers, plus
``common/accelerators.csv``.

Reduction rules:
* Only GPU rows are kept (``AcceleratorName`` non-empty; GCP TPUs dropped).
* Per instance type, the row with the cheapest on-demand ``Price`` is kept and
  its ``SpotPrice`` is replaced by the cheapest spot price seen for that
  instance type in any region.
* GCP prices GPUs separately from the VM they attach to, so each
  (accelerator, count) keeps the zone where GPU + host VM is cheapest, and the
  host VM row of that zone is kept too (SkyPilot pairs them per zone).

Every other column is copied verbatim, and each cloud keeps its own upstream
header, so SkyPilot's catalog readers can load the output unchanged.

Usage: build_catalog_snapshot.py RAW_DIR OUT_DIR
"""
import argparse
import csv
import pathlib
import sys
from collections.abc import Callable, Iterable

Row = dict[str, str]

# str(sky.utils.registry.CLOUD_REGISTRY.from_str(<dir>)) in SkyPilot 0.14.1.
# canonicalize_accelerator_name() matches these names inside the `Clouds`
# column of common/accelerators.csv, so they must be spelled exactly so.
CLOUD_DISPLAY_NAMES = {
    'aws': 'AWS',
    'azure': 'Azure',
    'cudo': 'Cudo',
    'do': 'DO',
    'fluidstack': 'Fluidstack',
    'gcp': 'GCP',
    'hyperbolic': 'Hyperbolic',
    'lambda': 'Lambda',
    'nebius': 'Nebius',
    'paperspace': 'Paperspace',
    'runpod': 'RunPod',
    'vast': 'Vast',
}

# Host VM families SkyPilot 0.14.1 attaches GCP GPUs to, copied from
# sky/catalog/gcp_catalog.py (_ACC_INSTANCE_TYPE_DICTS): accelerator ->
# count -> allowed host instance types.
GCP_DEDICATED_HOSTS = {
    'A100': {1: ['a2-highgpu-1g'], 2: ['a2-highgpu-2g'],
             4: ['a2-highgpu-4g'], 8: ['a2-highgpu-8g'],
             16: ['a2-megagpu-16g']},
    'A100-80GB': {1: ['a2-ultragpu-1g'], 2: ['a2-ultragpu-2g'],
                  4: ['a2-ultragpu-4g'], 8: ['a2-ultragpu-8g']},
    'L4': {1: ['g2-standard-4', 'g2-standard-8', 'g2-standard-12',
               'g2-standard-16', 'g2-standard-32'],
           2: ['g2-standard-24'], 4: ['g2-standard-48'],
           8: ['g2-standard-96']},
    'H100': {1: ['a3-highgpu-1g'], 2: ['a3-highgpu-2g'],
             4: ['a3-highgpu-4g'], 8: ['a3-highgpu-8g']},
    'H100-MEGA': {8: ['a3-megagpu-8g']},
    'H200': {8: ['a3-ultragpu-8g']},
    'B200': {8: ['a4-highgpu-8g']},
    'RTXPRO6000': {1: ['g4-standard-48'], 2: ['g4-standard-96'],
                   4: ['g4-standard-192'], 8: ['g4-standard-384']},
}
# Every other GCP GPU goes on an N1 VM with at least this many vCPUs and
# 4 GiB of memory per vCPU (gcp_catalog._NUM_ACC_TO_NUM_CPU and
# _DEFAULT_GPU_MEMORY_CPU_RATIO).
GCP_N1_FAMILIES = ('n1-standard-', 'n1-highmem-', 'n1-highcpu-')
GCP_N1_MIN_CPUS = {
    'K80': {1: 4, 2: 8, 4: 16, 8: 32, 16: 64},
    'V100': {1: 8, 2: 16, 4: 32, 8: 64},
    'T4': {1: 4, 2: 8, 4: 48},
    'P100': {1: 8, 2: 16, 4: 32, 8: 64},
    'DEFAULT': {1: 8, 2: 16, 4: 32, 8: 64, 16: 128},
}
GCP_GPU_MEMORY_PER_CPU = 4


def parse_price(value: str | None) -> float | None:
    """Returns the price in a cell, or None for an empty cell."""
    return float(value) if value not in (None, '') else None


def read_catalog(path: pathlib.Path) -> tuple[list[str], list[Row]]:
    with path.open(newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: pathlib.Path, header: list[str],
              rows: Iterable[Iterable[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='', encoding='utf-8') as f:
        # Minimal quoting and '\n' endings match pandas.to_csv, which wrote
        # the upstream files.
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(header)
        writer.writerows(rows)


def group_by(rows: Iterable[Row],
             key: Callable[[Row], tuple]) -> dict[tuple, list[Row]]:
    """Groups rows by key; groups and rows keep their input order."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def cheapest(rows: list[Row], column: str) -> Row | None:
    """Returns the first row with the lowest price in column, if any."""
    priced = [r for r in rows if parse_price(r.get(column)) is not None]
    if not priced:
        return None
    return min(priced, key=lambda r: parse_price(r[column]))


def with_min_spot(row: Row, group: list[Row]) -> Row:
    """Copies row, carrying the cheapest SpotPrice seen in its group."""
    row = dict(row)
    if 'SpotPrice' in row:
        cheapest_spot = cheapest(group, 'SpotPrice')
        row['SpotPrice'] = cheapest_spot['SpotPrice'] if cheapest_spot else ''
    return row


def reduce_per_instance_type(rows: list[Row]) -> list[Row]:
    """One row per instance type: cheapest on-demand, cheapest spot."""
    reduced = []
    for group in group_by(rows, lambda r: (r['InstanceType'],)).values():
        # Some offers are spot-only (empty Price); keep them anyway.
        best = (cheapest(group, 'Price') or cheapest(group, 'SpotPrice') or
                group[0])
        reduced.append(with_min_spot(best, group))
    return reduced


def gcp_host_candidates(accelerator: Row, zone_hosts: list[Row]) -> list[Row]:
    """The host VMs SkyPilot would pair with this GCP accelerator row."""
    name = accelerator['AcceleratorName']
    count = int(float(accelerator['AcceleratorCount']))
    if name in GCP_DEDICATED_HOSTS:
        allowed = GCP_DEDICATED_HOSTS[name].get(count, [])
        return [h for h in zone_hosts if h['InstanceType'] in allowed]
    min_cpus = GCP_N1_MIN_CPUS.get(name, GCP_N1_MIN_CPUS['DEFAULT']).get(count)
    if min_cpus is None:
        return []
    return [
        h for h in zone_hosts
        if h['InstanceType'].startswith(GCP_N1_FAMILIES) and
        float(h['vCPUs']) >= min_cpus and
        float(h['MemoryGiB']) >= min_cpus * GCP_GPU_MEMORY_PER_CPU
    ]


def reduce_gcp(rows: list[Row]) -> list[Row]:
    """Cheapest GPU + host pairing per (accelerator, count), with its host."""
    gpus = [
        r for r in rows if r['AcceleratorName'] and not r['InstanceType'] and
        not r['AcceleratorName'].startswith('tpu-')
    ]
    hosts_by_zone = group_by((r for r in rows if r['InstanceType']),
                             lambda r: (r['AvailabilityZone'],))
    kept_gpus: list[Row] = []
    kept_hosts: dict[tuple[str, str], Row] = {}
    groups = group_by(gpus,
                      lambda r: (r['AcceleratorName'], r['AcceleratorCount']))
    for (name, count), group in groups.items():
        best: tuple[float, Row, Row] | None = None
        for gpu in group:
            gpu_price = parse_price(gpu['Price'])
            zone_hosts = hosts_by_zone.get((gpu['AvailabilityZone'],), [])
            host = cheapest(gcp_host_candidates(gpu, zone_hosts), 'Price')
            if gpu_price is None or host is None:
                continue
            total = gpu_price + float(host['Price'])
            if best is None or total < best[0]:
                best = (total, gpu, host)
        if best is None:
            print(f'gcp: skipped {name}:{count}, no priced host VM in any of '
                  'its zones', file=sys.stderr)
            continue
        _, gpu, host = best
        kept_gpus.append(with_min_spot(gpu, group))
        kept_hosts[(host['InstanceType'], host['AvailabilityZone'])] = host
    # Upstream lists VM rows before accelerator rows; keep that layout.
    hosts = sorted(kept_hosts.values(),
                   key=lambda r: (r['InstanceType'], r['AvailabilityZone']))
    return hosts + kept_gpus


def build_cloud(cloud: str, raw: pathlib.Path,
                out: pathlib.Path) -> list[Row]:
    header, rows = read_catalog(raw)
    if cloud == 'gcp':
        reduced = reduce_gcp(rows)
    else:
        reduced = reduce_per_instance_type(
            [r for r in rows if r['AcceleratorName']])
    write_csv(out, header, ([r[c] for c in header] for r in reduced))
    return reduced


def accelerator_clouds(offers: dict[str, list[Row]]) -> dict[str, list[str]]:
    """Maps each accelerator name to the display names of its clouds."""
    clouds: dict[str, set] = {}
    for cloud, rows in offers.items():
        for row in rows:
            if row['AcceleratorName']:
                clouds.setdefault(row['AcceleratorName'],
                                  set()).add(CLOUD_DISPLAY_NAMES[cloud])
    return {name: sorted(names) for name, names in clouds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('raw_dir', type=pathlib.Path,
                        help='directory with <cloud>/vms.csv from upstream')
    parser.add_argument('out_dir', type=pathlib.Path,
                        help='where to write the reduced v8 catalog tree')
    args = parser.parse_args()

    offers = {}
    for raw in sorted(args.raw_dir.glob('*/vms.csv')):
        cloud = raw.parent.name
        if cloud not in CLOUD_DISPLAY_NAMES:
            sys.exit(f'unknown cloud directory {cloud!r}: add its SkyPilot '
                     'display name to CLOUD_DISPLAY_NAMES')
        offers[cloud] = build_cloud(cloud, raw,
                                    args.out_dir / cloud / 'vms.csv')
        print(f'{cloud}: {len(offers[cloud])} rows')

    # Same layout as upstream: names sorted, clouds as a Python list literal.
    mapping = accelerator_clouds(offers)
    write_csv(args.out_dir / 'common' / 'accelerators.csv',
              ['AcceleratorName', 'Clouds'],
              ([name, repr(mapping[name])] for name in sorted(mapping)))
    print(f'common/accelerators.csv: {len(mapping)} accelerators')


if __name__ == '__main__':
    main()
