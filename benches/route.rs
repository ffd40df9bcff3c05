//! Bench of the route family (`cuda/route.cu`): the routing tables an MoE block builds on the
//! device from its router's ids, 8 slots over the 30B shape's 128 experts: one row a tile for a
//! decode step (`route_rows`, 1 and 8 tokens) and sorted by expert for a prefill
//! (`route_count` + `route_sort`, 512 and 2048 tokens). Each call allocates its two tables, as
//! the MoE block does.
//!
//! Napkin math: a few KB to a few hundred KB of integers; launch- and latency-bound (one block
//! per expert walks all the ids). The same-run baseline is a device copy of the two tables'
//! bytes.

mod common;

use bitexact::kernels::route::RoutedRows;
use bitexact::GpuTensor;

const K: usize = 8;
const EXPERTS: usize = 128;

fn main() {
    common::run_family("route", |dev, group, rows| {
        for (n, sorted) in [(1usize, false), (8, false), (512, true), (2048, true)] {
            let ids: Vec<u32> = (0..n * K)
                .map(|r| ((r * 2654435761) % EXPERTS) as u32)
                .collect();
            let ids = GpuTensor::from_host(dev, &ids, &[n, K]).unwrap();
            let len = n * K;
            let words = match sorted {
                false => 9 * len,
                true => {
                    3 * len + 3 * (len / 64 + EXPERTS.min(len)) + 3 * (len / 8 + EXPERTS.min(len))
                }
            };
            let name = if sorted {
                "sorted_from_router"
            } else {
                "from_router"
            };
            common::bench_against_copy(group, dev, rows, "route", name, n, 2 * 4 * words, |_| {
                let tables = match sorted {
                    false => RoutedRows::from_router(dev, &ids, EXPERTS),
                    true => RoutedRows::sorted_from_router(dev, &ids, EXPERTS),
                };
                drop(tables.unwrap());
            });
        }

        format!(
            "route, {K} slots over {EXPERTS} experts, against a device copy of the tables' bytes"
        )
    });
}
