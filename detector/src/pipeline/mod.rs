//! From ring-buffer records to outputs: the event loop that reads the ring and ticks, the
//! reorder buffer that releases records in kernel-timestamp order behind a watermark, start-up
//! reconciliation, dispatch into the engine and out to the sinks, and the run's named steps.

pub mod dispatch;
pub mod event_loop;
pub mod reorder;
pub mod replay;
pub mod replay_feed;
pub mod run;
pub mod startup;
