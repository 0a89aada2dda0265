-- The demo schema: a small recruiting app. Applied by `walcast demo`.
CREATE TABLE IF NOT EXISTS candidates (
    id text PRIMARY KEY,
    "organizationId" text NOT NULL,
    name text NOT NULL,
    email text,
    ssn text,
    phone text,
    "createdBy" text,
    "createdAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS applications (
    id text PRIMARY KEY,
    "organizationId" text NOT NULL,
    "candidateId" text NOT NULL,
    stage text NOT NULL,
    score numeric(5, 2),
    "assigneeId" text,
    "updatedAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS notifications (
    id bigserial PRIMARY KEY,
    "organizationId" text NOT NULL,
    "userId" text NOT NULL,
    message text NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE candidates REPLICA IDENTITY FULL;
ALTER TABLE applications REPLICA IDENTITY FULL;
ALTER TABLE notifications REPLICA IDENTITY FULL;
