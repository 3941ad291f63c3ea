//! Re-sealing (key rotation): every sealed value of every connection moved
//! to the primary key, a bounded step at a time.

use rusqlite::params;
use uuid::Uuid;

use super::SecretColumn;
use crate::store::{Store, StoreError};

impl Store {
    /// One step of a re-sealing pass (key rotation): reads the next `rows`
    /// connections after `cursor` in storage order and re-seals, in one short
    /// write transaction, each of their values sealed under a key other than
    /// the primary. The cursor moves past them, so a pass over a million rows
    /// reads each row once and no step holds the write lock longer than its
    /// `rows` take; the step that ends the pass also re-seals the (few) open
    /// authorization links. Rows written behind the cursor meanwhile are
    /// sealed under the primary already, unless a process still holding an
    /// old keyring wrote them: the caller runs passes until one re-seals
    /// nothing.
    pub fn reseal_step(
        &mut self,
        cursor: &mut ResealCursor,
        rows: usize,
    ) -> Result<usize, StoreError> {
        let primary = self.keyring.current().primary().id().to_string();
        let after = cursor.after;
        let (done, last, seen) = self.write(|tx, kr| {
            let mut todo = Vec::new();
            let mut last = after;
            let mut seen = 0usize;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT rowid, id, client_secret, refresh_token, access_token
                     FROM connections WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                )?;
                let mut q = stmt.query(params![after, rows as i64])?;
                while let Some(r) = q.next()? {
                    seen += 1;
                    last = r.get(0)?;
                    let id: String = r.get(1)?;
                    for (i, col) in [
                        SecretColumn::ClientSecret,
                        SecretColumn::RefreshToken,
                        SecretColumn::AccessToken,
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let v: Option<Vec<u8>> = r.get(i + 2)?;
                        if let Some(v) = v
                            && crate::crypto::sealed_key_id(&v) != Some(primary.as_str())
                        {
                            todo.push((id.clone(), col, v));
                        }
                    }
                }
            }
            let mut done = 0;
            for (id_s, col, sealed) in todo {
                let id = Uuid::parse_str(&id_s)
                    .map_err(|_| StoreError::Corrupt(format!("connection id {id_s}")))?;
                let plain = kr.open(id, col.as_str(), &sealed)?;
                let resealed = kr.seal(id, col.as_str(), &plain);
                let sql = format!("UPDATE connections SET {} = ?2 WHERE id = ?1", col.as_str());
                tx.prepare_cached(&sql)?.execute(params![id_s, resealed])?;
                done += 1;
            }
            if seen < rows {
                done += crate::store::authorizations::reseal(tx, kr, &primary, usize::MAX)?;
            }
            Ok((done, last, seen))
        })?;
        cursor.after = last;
        cursor.resealed += done as u64;
        if seen < rows {
            cursor.finished = true;
        }
        Ok(done)
    }

    /// Runs re-sealing passes ([`Store::reseal_step`]) until one finds
    /// nothing left to re-seal; `progress` is told the running total after
    /// each step. Returns how many values were re-sealed.
    pub fn reseal_all(
        &mut self,
        rows: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut cursor = ResealCursor::default();
            while !cursor.finished {
                self.reseal_step(&mut cursor, rows)?;
                progress(total + cursor.resealed);
            }
            total += cursor.resealed;
            if cursor.resealed == 0 {
                return Ok(total);
            }
        }
    }
}

/// Where a re-sealing pass over the connections is ([`Store::reseal_step`]).
#[derive(Debug, Default, Clone)]
pub struct ResealCursor {
    /// The last rowid read.
    after: i64,
    /// Values re-sealed so far in this pass.
    pub resealed: u64,
    /// True once the pass has read the last row.
    pub finished: bool,
}
