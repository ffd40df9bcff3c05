//! A global allocator that records, per thread and while switched on, the largest single
//! allocation and the total bytes allocated: the fuzzer checks a parse never allocates out of
//! proportion to the file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Tracking;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    if ON.with(Cell::get) {
        LARGEST.with(|m| m.set(m.get().max(size)));
        TOTAL.with(|t| t.set(t.get() + size));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping touches
// only const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Runs `f` with tracking on; returns its result, the largest single allocation and the total.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    LARGEST.with(|m| m.set(0));
    TOTAL.with(|t| t.set(0));
    ON.with(|o| o.set(true));
    let r = f();
    ON.with(|o| o.set(false));
    (r, LARGEST.with(Cell::get), TOTAL.with(Cell::get))
}
