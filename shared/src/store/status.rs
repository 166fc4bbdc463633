//! Workflow status records (`crate::workflow::status`) beside the idempotency records, in the
//! SQL stores: one row per tracking id, merged on write so that a record only moves forward
//! (a late or repeated event never takes it back). Redis and S3 hold no status records: the
//! runtime logs and counts the events there, and `workflow status` says it needs SQL.

use super::AnyStore;
use crate::{
    error::{Error, Result},
    workflow::status::{State, Status},
};

/// Most records `workflow list` returns.
pub const MAX_LIST: usize = 10_000;

/// `new` merged into `old`: the state of the higher (or equal) rank, the larger counts.
#[cfg_attr(not(any(feature = "embedded", feature = "postgres")), allow(dead_code))]
pub(crate) fn merge(old: Option<Status>, new: &Status) -> Status {
    let Some(old) = old else { return new.clone() };
    let mut out = if new.state.rank() >= old.state.rank() {
        new.clone()
    } else {
        Status {
            updated_at: new.updated_at.clone(),
            ..old.clone()
        }
    };
    out.steps_done = old.steps_done.max(new.steps_done);
    out.compensated = old.compensated.max(new.compensated);
    out
}

fn unsupported() -> Error {
    Error::Invalid(
        "workflow status records need the sqlite or postgres idempotency store (store.kind)".into(),
    )
}

impl AnyStore {
    /// Writes (merges) one workflow's status record.
    pub async fn put_status(&self, status: &Status) -> Result<()> {
        match self {
            #[cfg(feature = "embedded")]
            AnyStore::Sqlite(s) => s.put_status(status).await,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres(s) => s.put_status(status).await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// One workflow's status record.
    pub async fn get_status(&self, id: &str) -> Result<Option<Status>> {
        match self {
            #[cfg(feature = "embedded")]
            AnyStore::Sqlite(s) => s.get_status(id).await,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres(s) => s.get_status(id).await,
            #[allow(unreachable_patterns)]
            _ => Err(unsupported()),
        }
    }

    /// The records in `state` (all, with `None`), by tracking id, at most `limit`.
    pub async fn list_status(&self, state: Option<State>, limit: usize) -> Result<Vec<Status>> {
        match self {
            #[cfg(feature = "embedded")]
            AnyStore::Sqlite(s) => s.list_status(state, limit.min(MAX_LIST)).await,
            #[cfg(feature = "postgres")]
            AnyStore::Postgres(s) => s.list_status(state, limit.min(MAX_LIST)).await,
            #[allow(unreachable_patterns)]
            _ => Err(unsupported()),
        }
    }
}

#[cfg_attr(not(any(feature = "embedded", feature = "postgres")), allow(dead_code))]
fn decode(doc: &str) -> Result<Status> {
    serde_json::from_str(doc)
        .map_err(|e| Error::Invalid(format!("a workflow status record does not decode: {e}")))
}

#[cfg(feature = "embedded")]
mod sqlite {
    use rusqlite::{params, OptionalExtension};

    use super::{decode, merge};
    use crate::{
        error::Result,
        store::sqlite::{store_err, SqliteStore},
        time::unix_ms,
        workflow::status::{State, Status},
    };

    impl SqliteStore {
        /// Merges one status record (see the module doc).
        pub async fn put_status(&self, status: &Status) -> Result<()> {
            let new = status.clone();
            self.tx(move |tx| {
                let old: Option<String> = tx
                    .query_row(
                        "SELECT doc FROM workflow_status WHERE id = ?1",
                        params![new.id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(store_err)?;
                let old = old.map(|d| decode(&d)).transpose()?;
                let merged = merge(old, &new);
                let doc = serde_json::to_string(&merged).expect("a status serializes");
                tx.execute(
                    "INSERT INTO workflow_status (id, workflow, state, rank, doc, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (id) DO UPDATE SET workflow = excluded.workflow,
                         state = excluded.state, rank = excluded.rank, doc = excluded.doc,
                         updated_at = excluded.updated_at",
                    params![
                        merged.id,
                        merged.workflow,
                        merged.state.as_str(),
                        merged.state.rank(),
                        doc,
                        unix_ms(std::time::SystemTime::now())
                    ],
                )
                .map_err(store_err)?;
                Ok(())
            })
            .await
        }

        /// One status record.
        pub async fn get_status(&self, id: &str) -> Result<Option<Status>> {
            let id = id.to_owned();
            self.tx(move |tx| {
                let doc: Option<String> = tx
                    .query_row(
                        "SELECT doc FROM workflow_status WHERE id = ?1",
                        params![id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(store_err)?;
                doc.map(|d| decode(&d)).transpose()
            })
            .await
        }

        /// Status records in a state, by id.
        pub async fn list_status(&self, state: Option<State>, limit: usize) -> Result<Vec<Status>> {
            self.tx(move |tx| {
                let mut stmt = tx
                    .prepare(
                        "SELECT doc FROM workflow_status WHERE ?1 IS NULL OR state = ?1
                         ORDER BY id LIMIT ?2",
                    )
                    .map_err(store_err)?;
                let rows = stmt
                    .query_map(params![state.map(State::as_str), limit as i64], |r| {
                        r.get::<_, String>(0)
                    })
                    .map_err(store_err)?;
                let mut out = Vec::new();
                for doc in rows {
                    out.push(decode(&doc.map_err(store_err)?)?);
                }
                Ok(out)
            })
            .await
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::{decode, merge};
    use crate::{
        error::Result,
        store::postgres::{pg_err, PostgresStore},
        workflow::status::{State, Status},
    };

    impl PostgresStore {
        /// Merges one status record (see the module doc): the row is locked while merged.
        pub async fn put_status(&self, status: &Status) -> Result<()> {
            let mut conn = self.conn().await?;
            let tx = conn.transaction().await.map_err(pg_err)?;
            // Make the row exist, then lock it: concurrent writers merge one after the other.
            let doc = serde_json::to_string(status).expect("a status serializes");
            tx.execute(
                "INSERT INTO sluice_workflow_status (id, workflow, state, doc) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
                &[&status.id, &status.workflow, &status.state.as_str(), &doc],
            )
            .await
            .map_err(pg_err)?;
            let row = tx
                .query_one(
                    "SELECT doc FROM sluice_workflow_status WHERE id = $1 FOR UPDATE",
                    &[&status.id],
                )
                .await
                .map_err(pg_err)?;
            let old = decode(&row.get::<_, String>(0))?;
            let merged = merge(Some(old), status);
            let doc = serde_json::to_string(&merged).expect("a status serializes");
            tx.execute(
                "UPDATE sluice_workflow_status SET state = $2, doc = $3, updated_at = now() WHERE id = $1",
                &[&merged.id, &merged.state.as_str(), &doc],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        }

        /// One status record.
        pub async fn get_status(&self, id: &str) -> Result<Option<Status>> {
            let conn = self.conn().await?;
            let row = conn
                .query_opt(
                    "SELECT doc FROM sluice_workflow_status WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(pg_err)?;
            row.map(|r| decode(&r.get::<_, String>(0))).transpose()
        }

        /// Status records in a state, by id.
        pub async fn list_status(&self, state: Option<State>, limit: usize) -> Result<Vec<Status>> {
            let conn = self.conn().await?;
            let state = state.map(|s| s.as_str().to_owned());
            let rows = conn
                .query(
                    "SELECT doc FROM sluice_workflow_status WHERE $1::TEXT IS NULL OR state = $1
                     ORDER BY id LIMIT $2",
                    &[&state, &(limit as i64)],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| decode(&r.get::<_, String>(0)))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::EventKind;

    fn status(state: State, done: u32) -> Status {
        Status {
            id: "t".into(),
            workflow: "w".into(),
            state,
            event: EventKind::StepCompleted,
            step: "a".into(),
            steps_done: done,
            compensated: 0,
            reason: None,
            updated_at: "x".into(),
        }
    }

    #[test]
    fn a_record_never_moves_back() {
        let done = merge(None, &status(State::Completed, 4));
        let late = merge(Some(done.clone()), &status(State::Running, 2));
        assert_eq!((late.state, late.steps_done), (State::Completed, 4));
        let failed = merge(None, &status(State::CompensationFailed, 2));
        let redriven = merge(Some(failed), &status(State::Compensated, 0));
        assert_eq!(
            (redriven.state, redriven.steps_done),
            (State::Compensated, 2)
        );
    }

    #[cfg(feature = "embedded")]
    #[tokio::test]
    async fn sqlite_keeps_lists_and_merges_status_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let s = crate::store::sqlite::SqliteStore::open(path.to_str().unwrap(), 1 << 16)
            .await
            .unwrap();
        let s = AnyStore::Sqlite(s);
        s.put_status(&status(State::Running, 1)).await.unwrap();
        s.put_status(&status(State::Completed, 4)).await.unwrap();
        s.put_status(&status(State::Running, 3)).await.unwrap();
        let got = s.get_status("t").await.unwrap().unwrap();
        assert_eq!((got.state, got.steps_done), (State::Completed, 4));
        assert_eq!(
            s.list_status(Some(State::Completed), 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(s
            .list_status(Some(State::Running), 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.get_status("nope").await.unwrap(), None);
    }
}
