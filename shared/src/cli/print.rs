//! What the queue commands print for people (`--json` prints the types as JSON instead).

use crate::{
    dead_letter::DeadLetter,
    message::{OldestAge, QueueStats},
    text::one_line,
};

pub(super) fn dead_letters(items: &[DeadLetter]) {
    if items.is_empty() {
        println!("dead-letter queue is empty");
        return;
    }
    println!(
        "{:<36}  {:>8}  {:<10}  last error",
        "id", "attempts", "class"
    );
    for dl in items {
        println!(
            "{:<36}  {:>8}  {:<10}  {}",
            dl.id,
            dl.attempts,
            dl.error_class.as_str(),
            one_line(&dl.last_error, 80)
        );
    }
}

pub(super) fn dead_letter(dl: &DeadLetter) {
    println!("id                {}", dl.id);
    println!("function          {}", dl.function);
    println!("original queue    {}", dl.original_queue);
    println!("error class       {}", dl.error_class.as_str());
    println!("attempts          {}", dl.attempts);
    println!("first failure at  {}", dl.first_failure_at);
    println!("last failure at   {}", dl.last_failure_at);
    println!("dead-lettered at  {}", dl.dead_lettered_at);
    println!("redriven before   {}", dl.redriven);
    if let Some(from) = &dl.redriven_from {
        println!("redriven from     {from}");
    }
    if let Some(trace) = &dl.trace_id {
        println!("trace id          {trace}");
    }
    println!("last error        {}", dl.last_error);
    for (k, v) in &dl.headers {
        println!("header            {k}: {v}");
    }
    match (&dl.body, &dl.body_hex) {
        (Some(b), _) => println!("body              {b}"),
        (None, Some(h)) => println!("body (hex)        {h}"),
        _ => {}
    }
}

pub(super) fn redriven(moved: &[DeadLetter], dry_run: bool) {
    let verb = if dry_run { "would redrive" } else { "redrove" };
    println!("{verb} {} message(s)", moved.len());
    for dl in moved {
        println!(
            "  {}  {:<10} {}",
            dl.id,
            dl.error_class.as_str(),
            one_line(&dl.last_error, 90)
        );
    }
}

/// The `stats` table.
pub(super) fn stats(queue: &str, s: &QueueStats) -> String {
    format!(
        "queue          {queue}\n\
         ready          {}\n\
         in_flight      {}\n\
         delayed        {}\n\
         dead_lettered  {}\n\
         oldest_ready   {}\n",
        s.ready,
        s.in_flight,
        s.delayed,
        s.dead_lettered,
        oldest(s.oldest_ready)
    )
}

/// One reading of `stats --watch` on one line.
pub(super) fn stats_line(s: &QueueStats) -> String {
    let age = match s.oldest_ready {
        OldestAge::Known(d) => age(d),
        OldestAge::Unknown(_) => "unknown".into(),
    };
    format!(
        "ready={} in_flight={} delayed={} dead_lettered={} oldest_ready={age}",
        s.ready, s.in_flight, s.delayed, s.dead_lettered
    )
}

fn oldest(a: OldestAge) -> String {
    match a {
        OldestAge::Known(d) => age(d),
        OldestAge::Unknown(why) => format!("unknown: {why}"),
    }
}

/// An age to the millisecond below a minute, to the second above.
fn age(d: std::time::Duration) -> String {
    let d = if d < std::time::Duration::from_secs(60) {
        std::time::Duration::from_millis(d.as_millis() as u64)
    } else {
        std::time::Duration::from_secs(d.as_secs())
    };
    humantime::format_duration(d).to_string()
}
