//! Kubernetes Events as an output of `detector run`: one notice per race on its pods.

use anyhow::Result;

use super::verdict::notice;
use super::{Sink, VerdictOut};
use crate::k8s::EventSender;

pub struct EventSink(pub EventSender);

impl Sink for EventSink {
    fn verdict(&mut self, v: &VerdictOut<'_>) -> Result<()> {
        self.0.send(notice(v.verdict, v.pods, v.trace_file));
        Ok(())
    }
}
