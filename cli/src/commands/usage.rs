//! `gpuwasm usage`: what a tenant's requests used and cost, and what the
//! same traffic would cost on a dedicated machine.

use crate::args::ServerArgs;
use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm_server::api::{UsageReport, UsageRow};
use http::Method;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Examples:
  gpuwasm usage                                  # your tenant, last 24 hours, by deployment
  gpuwasm usage --since 7d --by day --json
  gpuwasm usage --all --by tenant                # admin: every tenant
  gpuwasm usage --since 30d --compare-dedicated 568")]
pub struct UsageArgs {
    /// The period: seconds, or a number with s, m, h or d.
    #[arg(long, default_value = "24h")]
    since: String,
    /// How to group requests.
    #[arg(long, default_value = "deployment", value_parser = ["deployment", "model", "day", "tenant"])]
    by: String,
    /// The tenant to report on (admin only; default: your token's).
    #[arg(long, conflicts_with = "all")]
    tenant: Option<String>,
    /// Every tenant (admin only).
    #[arg(long)]
    all: bool,
    /// Print the server's JSON report.
    #[arg(long)]
    json: bool,
    /// A dedicated machine's price per month: print what this traffic
    /// would cost a month on it and at the server's prices, and the
    /// utilisation at which the two cost the same.
    #[arg(long, value_name = "PRICE_PER_MONTH")]
    compare_dedicated: Option<f64>,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: UsageArgs) -> Result<ExitCode> {
    if gpuwasm_server::parse_duration(&args.since).is_none_or(|d| d.is_zero()) {
        bail!("--since {:?}: give a duration such as 3600, 90m, 24h or 7d", args.since);
    }
    if args.compare_dedicated.is_some_and(|p| !p.is_finite() || p <= 0.0) {
        bail!("--compare-dedicated takes a price per month greater than 0");
    }
    let mut path = format!("usage?since={}&by={}", args.since, args.by);
    if let Some(tenant) = &args.tenant {
        path.push_str(&format!("&tenant={tenant}"));
    }
    if args.all {
        path.push_str("&all=1");
    }
    let report: UsageReport = args.server.api()?.admin(Method::GET, &path, Bytes::new()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if let Some(price) = args.compare_dedicated {
        println!();
        print!("{}", compare_dedicated(&report, price));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(report: &UsageReport) {
    let who = report.tenant.as_deref().map_or("every tenant".to_string(), |t| format!("tenant {t}"));
    println!("usage of {who} over the last {}, by {}", span(report.until_unix - report.since_unix), report.by);
    println!(
        "{:<32} {:>9} {:>7} {:>12} {:>12} {:>14} {:>10} {:>10} {:>12}",
        report.by, "requests", "errors", "cpu s", "inference s", "memory GB-s", "in MB", "out MB", "cost"
    );
    for row in report.rows.iter().chain([&report.total]) {
        println!("{}", line(row));
    }
}

fn line(row: &UsageRow) -> String {
    let t = &row.totals;
    let errors = t.requests - t.outcomes.get("ok").copied().unwrap_or(0);
    let inference: u64 = t.inference_us.values().sum();
    format!(
        "{:<32} {:>9} {:>7} {:>12.3} {:>12.3} {:>14.4} {:>10.2} {:>10.2} {:>12.6}",
        row.key,
        t.requests,
        errors,
        t.guest_cpu_us as f64 / 1e6,
        inference as f64 / 1e6,
        t.gb_seconds,
        t.bytes_in as f64 / 1e6,
        t.bytes_out as f64 / 1e6,
        row.cost
    )
}

/// The period in words.
fn span(secs: u64) -> String {
    match secs {
        s if s % 86_400 < 60 && s >= 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{:.1} hours", s as f64 / 3600.0),
        s => format!("{} minutes", s.div_ceil(60)),
    }
}

/// Seconds in the month the comparison uses (30 days).
const MONTH_SECS: f64 = 30.0 * 86_400.0;

/// What the report's traffic costs a month here against a dedicated
/// machine at `price` a month: the traffic's cost scaled from its period to
/// a month; its busy time (CPU and device seconds) as a share of the
/// period; and the busy share at which serverless costs as much as the
/// dedicated machine (the dedicated price over the cost of being busy all
/// month at this traffic's cost per busy second).
fn compare_dedicated(report: &UsageReport, price: f64) -> String {
    let t = &report.total.totals;
    let period = (report.until_unix - report.since_unix).max(1) as f64;
    let busy = (t.guest_cpu_us + t.inference_us.values().sum::<u64>()) as f64 / 1e6;
    let monthly = report.total.cost * MONTH_SECS / period;
    let mut out = format!("serverless at the server's prices: {monthly:.2} a month for this traffic (its cost over {}, scaled to 30 days)\n", span(period as u64));
    out.push_str(&format!("dedicated: {price:.2} a month\n"));
    if busy <= 0.0 || report.total.cost <= 0.0 {
        out.push_str("no busy time or no cost in this period (set prices with gpuwasm serve --prices): nothing to compare\n");
        return out;
    }
    let utilisation = busy / period;
    let full_month = report.total.cost / busy * MONTH_SECS;
    let break_even = price / full_month;
    out.push_str(&format!(
        "busy {:.2}% of the time ({:.1} h a day); serverless costs as much as dedicated at {:.1}% ({:.1} h a day)\n",
        utilisation * 100.0,
        utilisation * 24.0,
        break_even * 100.0,
        break_even * 24.0
    ));
    out.push_str(if monthly < price { "serverless is cheaper for this traffic\n" } else { "dedicated is cheaper for this traffic\n" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwasm_server::{Prices, Totals};

    /// The comparison against hand-computed values: a day with 2 busy
    /// hours (one of CPU, one of GPU) costing 2.00 is 60.00 a month; busy
    /// all 720 hours of a month at 1.00 an hour it would cost 720.00, so a
    /// 180.00 machine breaks even at 25% (6 h a day).
    #[test]
    fn dedicated_comparison_by_hand() {
        let totals = Totals { requests: 10, guest_cpu_us: 3_600_000_000, inference_us: [("cuda:H200".to_string(), 3_600_000_000)].into(), ..Totals::default() };
        let report = UsageReport {
            tenant: Some("acme".into()),
            since_unix: 0,
            until_unix: 86_400,
            by: "deployment".into(),
            prices: Prices::default(),
            rows: Vec::new(),
            total: UsageRow { key: "total".into(), totals, cost: 2.0 },
        };
        let text = compare_dedicated(&report, 180.0);
        assert!(text.contains("60.00 a month"), "{text}");
        assert!(text.contains("busy 8.33% of the time (2.0 h a day)"), "{text}");
        assert!(text.contains("at 25.0% (6.0 h a day)"), "{text}");
        assert!(text.contains("serverless is cheaper"), "{text}");
        assert!(compare_dedicated(&report, 30.0).contains("dedicated is cheaper"));
    }
}
