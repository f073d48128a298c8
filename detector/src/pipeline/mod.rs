//! From ring-buffer records to engine inputs: the event loop that reads the ring and ticks,
//! and the reorder buffer that releases records in kernel-timestamp order behind a watermark.

pub mod event_loop;
pub mod reorder;
