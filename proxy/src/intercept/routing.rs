//! The local-delivery policy route that makes marked packets reach the proxy:
//! `ip rule add fwmark INTERCEPT_MARK lookup ROUTE_TABLE` and
//! `ip route add local 0.0.0.0/0 dev lo table ROUTE_TABLE`, through netlink.
//!
//! The agent removes exactly what it added when it shuts down ([`Routing::remove`]).
use super::InterceptError;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};
use shepherd_common::{INTERCEPT_MARK, ROUTE_TABLE, RULE_PRIORITY};
use std::net::Ipv4Addr;

pub struct Routing {
    handle: Handle,
    route: RouteMessage,
    rule: RuleMessage,
}

fn err(step: &'static str) -> impl Fn(rtnetlink::Error) -> InterceptError {
    move |e| InterceptError::Routing {
        step,
        detail: e.to_string(),
    }
}

impl Routing {
    /// Installs the rule and route (replacing leftovers of a crashed agent).
    pub async fn install() -> Result<Self, InterceptError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| InterceptError::Routing {
                step: "netlink socket",
                detail: e.to_string(),
            })?;
        tokio::spawn(conn);
        let lo =
            super::ebpf::nix_if_index("lo").ok_or(InterceptError::NoSuchInterface("lo".into()))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        handle
            .route()
            .add(route.clone())
            .replace()
            .execute()
            .await
            .map_err(err("add local route"))?;
        let mut req = handle
            .rule()
            .add()
            .v4()
            .fw_mark(INTERCEPT_MARK)
            .table_id(ROUTE_TABLE)
            .priority(RULE_PRIORITY)
            .action(RuleAction::ToTable);
        let rule = req.message_mut().clone();
        // A leftover identical rule (agent killed with SIGKILL) is fine: the
        // rule is the same and we remove it on shutdown.
        match req.execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(err("add fwmark rule")(e)),
        }
        tracing::info!(
            table = ROUTE_TABLE,
            mark = format_args!("{INTERCEPT_MARK:#x}"),
            "local-delivery policy route installed"
        );
        Ok(Self {
            handle,
            route,
            rule,
        })
    }

    /// Removes the rule and route this agent installed.
    pub async fn remove(self) {
        if let Err(e) = self.handle.rule().del(self.rule).execute().await {
            tracing::warn!(error = %e, "removing the fwmark rule failed");
        }
        if let Err(e) = self.handle.route().del(self.route).execute().await {
            tracing::warn!(error = %e, "removing the local route failed");
        }
    }
}
