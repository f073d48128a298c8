//! The HTTP hub as an output of `detector run`: records to `/v1/events` clients (rendered only
//! while one listens), races to `/v1/races` and `/v1/events`.

use std::sync::Arc;

use anyhow::Result;

use super::stream::{Hub, Item};
use crate::report::{ConfirmationOut, Record, Sink, VerdictOut};

pub struct HubSink(pub Arc<Hub>);

impl Sink for HubSink {
    fn event(&mut self, r: &Record<'_>) -> Result<()> {
        if self.0.events.clients() > 0 {
            self.0.events.publish(Item {
                json: r.json().to_string(),
                text: r.text().to_string(),
            });
        }
        Ok(())
    }

    fn verdict(&mut self, v: &VerdictOut<'_>) -> Result<()> {
        let item = || Item {
            json: v.json.to_string(),
            text: v.text.to_string(),
        };
        self.0.events.publish(item());
        self.0.races.publish(item());
        Ok(())
    }

    /// Confirmations follow their race on both streams, so `/v1/races` (and `detector
    /// watch`) show whether each race denied a packet.
    fn confirmation(&mut self, c: &ConfirmationOut<'_>) -> Result<()> {
        let item = || Item {
            json: c.json.to_string(),
            text: c.text.to_string(),
        };
        self.0.events.publish(item());
        self.0.races.publish(item());
        Ok(())
    }
}
