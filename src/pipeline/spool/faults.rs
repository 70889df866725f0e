//! Failures the tests make happen, and the order in which value files were synced and deleted.
//! Per thread, so that tests running at once do not see each other's.

use std::cell::RefCell;
use std::mem::discriminant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Point {
    /// A value is appended.
    Append,
    /// A value file is synced (by an insert, a compaction or a flush).
    Sync(u32),
    /// A value file is deleted.
    Delete(u32),
    /// A batch is applied to the index.
    ApplyIndex,
    /// The index is flushed.
    FlushIndex,
}

thread_local! {
    /// Points that fail, each after letting this many more through.
    static ARMED: RefCell<Vec<(Point, u32)>> = const { RefCell::new(Vec::new()) };
    /// Points passed.
    static PASSED: RefCell<Vec<Point>> = const { RefCell::new(Vec::new()) };
}

/// Makes every `point` (of any file) fail once `after` more have passed.
pub(super) fn arm(point: Point, after: u32) {
    ARMED.with_borrow_mut(|armed| armed.push((point, after)));
}

/// Lets everything pass again and forgets what passed.
pub(super) fn clear() {
    ARMED.with_borrow_mut(Vec::clear);
    PASSED.with_borrow_mut(Vec::clear);
}

/// The points passed since [`clear`], in order.
pub(super) fn passed() -> Vec<Point> {
    PASSED.with_borrow(Clone::clone)
}

pub(super) fn hit(point: Point) -> std::io::Result<()> {
    let fails = ARMED.with_borrow_mut(|armed| {
        armed.iter_mut().filter(|(p, _)| discriminant(p) == discriminant(&point)).any(|(_, left)| {
            let fails = *left == 0;
            *left = left.saturating_sub(1);
            fails
        })
    });
    if fails {
        return Err(std::io::Error::other(format!("injected failure at {point:?}")));
    }
    PASSED.with_borrow_mut(|passed| passed.push(point));
    Ok(())
}
