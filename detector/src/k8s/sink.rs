//! Kubernetes Events as an output of `detector run`: one notice per race on its pods.

use anyhow::Result;

use super::EventSender;
use crate::report::verdict::notice;
use crate::report::{Sink, VerdictOut};

pub struct EventSink(pub EventSender);

impl Sink for EventSink {
    fn verdict(&mut self, v: &VerdictOut<'_>) -> Result<()> {
        self.0.send(notice(v.verdict, v.pods, v.trace_file));
        Ok(())
    }
}
