//! The queue commands: they open the transport alone (no state initializer, no store;
//! `provision` also creates what the store needs), and only `provision` creates queues.

use tracing::Instrument;

use super::{print, read_body, DlqCommand, Outcome, SendArgs};
use crate::{
    config::Settings,
    error::{Error, Result},
    message::{check_input, OutgoingMessage, RedriveFilter},
    store::AnyStore,
    telemetry::trace,
    transport::{AnyTransport, Transport},
};

/// Most messages published per transaction by `send --count`.
const SEND_CHUNK: usize = 500;

/// `send`: the body checked as the worker would check it (limits, header rules), then
/// published in transactions of [`SEND_CHUNK`].
pub(super) async fn send(t: &AnyTransport, settings: &Settings, args: SendArgs) -> Result<Outcome> {
    let body = read_body(args.json, args.file)?;
    let mut headers = crate::message::Headers::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--header {h:?}: expected NAME=VALUE")))?;
        headers.insert(name.trim().to_ascii_lowercase(), value.to_owned());
    }
    // Refuse here what the worker would dead-letter: limits and header rules (not the body's
    // JSON, so that bad input can still be sent on purpose).
    check_input(&body, &headers, &settings.limits).map_err(|(_, reason)| Error::Limit(reason))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let templated = text.contains("{{seq}}");
    let caller = trace::caller_context(args.traceparent.as_deref());
    let (span, context) = trace::start_send(
        trace::messaging_system(settings.transport.kind),
        &settings.queue,
        args.count,
        caller,
    );
    let envelope = crate::envelope::Envelope {
        trace: context,
        ..Default::default()
    };
    async move {
        #[cfg(feature = "faults")]
        let poison_rate = settings.fault.poison_rate;
        let mut sent = 0usize;
        let mut batch = Vec::with_capacity(SEND_CHUNK.min(args.count));
        for seq in 0..args.count {
            #[cfg_attr(not(feature = "faults"), allow(unused_mut))]
            let mut b = if templated {
                text.replace("{{seq}}", &seq.to_string()).into_bytes()
            } else {
                body.clone()
            };
            #[cfg(feature = "faults")]
            if poison_rate > 0.0 && rand::random::<f64>() < poison_rate {
                // fault.poison_rate: a corrupted body exercises the bad-input path.
                b.truncate(b.len() / 2);
                b.extend_from_slice(b"\xff<poison>");
            }
            batch.push(OutgoingMessage {
                body: b,
                headers: headers.clone(),
                delay: args.delay.unwrap_or_default(),
                envelope: envelope.clone(),
            });
            if batch.len() == SEND_CHUNK || seq + 1 == args.count {
                let n = batch.len();
                let ids = t.publish(std::mem::take(&mut batch)).await?;
                sent += n;
                if args.count == 1 {
                    println!("{}", ids[0]);
                }
            }
        }
        if args.count != 1 {
            println!("sent {sent} message(s) to {}", settings.queue);
        }
        Ok(Outcome::Done)
    }
    .instrument(span)
    .await
}

/// `dlq list` and `dlq show`.
pub(super) async fn dlq(t: &AnyTransport, command: DlqCommand) -> Result<Outcome> {
    match command {
        DlqCommand::List { limit, json } => {
            let items = t.dlq_list(limit).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).expect("serializes")
                );
            } else {
                print::dead_letters(&items);
            }
        }
        DlqCommand::Show { id, json } => match t.dlq_get(&id).await? {
            None => {
                eprintln!("error: no dead letter with id {id}");
                return Ok(Outcome::NotFound);
            }
            Some(dl) if json => {
                println!("{}", serde_json::to_string_pretty(&dl).expect("serializes"))
            }
            Some(dl) => print::dead_letter(&dl),
        },
    }
    Ok(Outcome::Done)
}

/// `redrive`: the shared loop (`dlq.rs`) with the command's filter.
pub(super) async fn redrive(
    t: &AnyTransport,
    filter: &RedriveFilter,
    json: bool,
) -> Result<Outcome> {
    if let Some(rate) = filter.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(Error::Invalid(format!(
                "--rate {rate}: must be a positive number of messages per second"
            )));
        }
    }
    let moved = t.redrive(filter).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&moved).expect("serializes")
        );
    } else {
        print::redriven(&moved, filter.dry_run);
    }
    Ok(Outcome::Done)
}

/// `stats`.
pub(super) async fn stats(t: &AnyTransport, settings: &Settings, json: bool) -> Result<Outcome> {
    let s = t.stats().await?;
    if json {
        println!("{}", serde_json::to_string(&s).expect("serializes"));
    } else {
        print!("{}", print::stats(&settings.queue, &s));
    }
    Ok(Outcome::Done)
}

/// `stats --watch`: a reading every `interval` until SIGINT or SIGTERM (exit 0). On a
/// terminal the table is redrawn in place; to a pipe or file each reading is one line (JSON
/// with `--json`), so the output can be followed or parsed. A failed reading is printed as
/// an error line and the watch goes on: a broker that is briefly away is what one watches for.
pub(super) async fn watch_stats(
    t: &AnyTransport,
    settings: &Settings,
    json: bool,
    interval: std::time::Duration,
) -> Result<Outcome> {
    use std::io::{IsTerminal, Write};
    use tokio::signal::unix::{signal, SignalKind};

    let mut term = signal(SignalKind::terminate())?;
    let redraw = !json && std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let now = crate::time::rfc3339(std::time::SystemTime::now());
        let reading = t.stats().await;
        let mut out = std::io::stdout().lock();
        match reading {
            Ok(s) if json => {
                let mut v = serde_json::to_value(s).expect("serializes");
                v["at"] = serde_json::Value::String(now);
                writeln!(out, "{v}")?;
            }
            // Cursor home and the screen cleared, then the table.
            Ok(s) if redraw => writeln!(
                out,
                "\x1b[H\x1b[2J{}{:<15}{now}  (every {}; Ctrl-C ends)",
                print::stats(&settings.queue, &s),
                "at",
                humantime::format_duration(interval)
            )?,
            Ok(s) => writeln!(out, "{now}  {}", print::stats_line(&s))?,
            Err(e) => writeln!(out, "{now}  error: {}", e.report())?,
        }
        out.flush()?;
    }
    Ok(Outcome::Done)
}

/// `provision`: the queues, and what the idempotency store needs beyond its schema.
pub(super) async fn provision(t: AnyTransport, settings: &Settings) -> Result<Outcome> {
    t.provision().await?;
    println!("provisioned queue {}", settings.queue);
    if let Some(store) = AnyStore::open(settings).await? {
        store.provision().await?;
        println!(
            "provisioned the {} idempotency store",
            settings.store.kind.name()
        );
    }
    Ok(Outcome::Done)
}
