-- PostgreSQL gift-storm wallet baseline (adapted from the shared peers kit).
-- psql -v ON_ERROR_STOP=1 -v users=N -v bal=C -v streamers=M -f pg_wallet.sql <db>
-- Users 0..N-1 with C coins; streamers 1000000000..1000000000+M-1 at 0. One tip = one transaction
-- = tip(): INSERT the tip id ON CONFLICT DO NOTHING (idempotency, kept forever), conditional
-- debit (UPDATE ... WHERE balance >= amt), credit; 1 applied, 0 rejected (recorded), -1/-2 duplicate.
\set ON_ERROR_STOP 1
DROP TABLE IF EXISTS transfers;
DROP TABLE IF EXISTS accounts;
CREATE TABLE accounts (
  id      bigint PRIMARY KEY,
  balance bigint NOT NULL CHECK (balance >= 0)
) WITH (fillfactor = 80);
CREATE TABLE transfers (
  id         bigint PRIMARY KEY,
  from_id    bigint  NOT NULL,
  to_id      bigint  NOT NULL,
  amount     bigint  NOT NULL,
  ok         boolean NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO accounts SELECT g, :bal FROM generate_series(0, :users - 1) AS g;
INSERT INTO accounts SELECT 1000000000 + g, 0 FROM generate_series(0, :streamers - 1) AS g;

CREATE OR REPLACE FUNCTION tip(p_tip bigint, p_from bigint, p_to bigint, p_amount bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  prev boolean;
BEGIN
  IF p_amount <= 0 THEN RAISE EXCEPTION 'bad amount %', p_amount; END IF;
  INSERT INTO transfers (id, from_id, to_id, amount, ok) VALUES (p_tip, p_from, p_to, p_amount, true)
  ON CONFLICT (id) DO NOTHING;
  IF NOT FOUND THEN
    SELECT ok INTO prev FROM transfers WHERE id = p_tip;
    RETURN CASE WHEN prev THEN -1 ELSE -2 END;
  END IF;
  UPDATE accounts SET balance = balance - p_amount WHERE id = p_from AND balance >= p_amount;
  IF NOT FOUND THEN
    UPDATE transfers SET ok = false WHERE id = p_tip;
    RETURN 0;
  END IF;
  UPDATE accounts SET balance = balance + p_amount WHERE id = p_to;
  IF NOT FOUND THEN RAISE EXCEPTION 'unknown streamer %', p_to; END IF;
  RETURN 1;
END
$$;
VACUUM (ANALYZE) accounts;
ANALYZE transfers;
