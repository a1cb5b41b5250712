//! The client side of a downstream connection: what conductor says it is, and what it does
//! with the notifications the downstream sends.
#![allow(
    deprecated,
    reason = "logging is deprecated in 2026-07-28, but older downstreams still send it"
)]

use rmcp::ClientHandler;
use rmcp::model::{
    ClientCapabilities, ClientConfig, Implementation, LoggingLevel, LoggingMessageNotificationParam,
};
use rmcp::service::{NotificationContext, RoleClient};
use tokio::sync::mpsc;

use super::{Event, ListKind};
use crate::config::ServerName;

/// Handles one downstream's notifications by turning them into [`Event`]s.
#[derive(Debug, Clone)]
pub struct DownstreamClient {
    server: ServerName,
    events: mpsc::UnboundedSender<Event>,
}

impl DownstreamClient {
    pub fn new(server: ServerName, events: mpsc::UnboundedSender<Event>) -> Self {
        DownstreamClient { server, events }
    }

    fn list_changed(&self, kind: ListKind) {
        let _ = self.events.send(Event::ListChanged {
            server: self.server.clone(),
            kind,
        });
    }
}

impl ClientHandler for DownstreamClient {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("mcp-conductor", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Tools);
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Prompts);
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Resources);
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let server = &self.server;
        let logger = params.logger.as_deref().unwrap_or("");
        let data = params.data;
        match params.level {
            LoggingLevel::Debug => {
                tracing::debug!(server = %server, logger, %data, "downstream log")
            }
            LoggingLevel::Info | LoggingLevel::Notice => {
                tracing::info!(server = %server, logger, %data, "downstream log")
            }
            LoggingLevel::Warning => {
                tracing::warn!(server = %server, logger, %data, "downstream log")
            }
            _ => tracing::error!(server = %server, logger, %data, "downstream log"),
        }
    }
}
