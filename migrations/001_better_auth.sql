-- The Better Auth tables walcast's default session store reads. Created only where
-- missing, so a database that already runs Better Auth keeps its own definitions.
CREATE TABLE IF NOT EXISTS "user" (
    id text PRIMARY KEY,
    name text NOT NULL DEFAULT '',
    email text NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL DEFAULT false,
    image text,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS organization (
    id text PRIMARY KEY,
    name text NOT NULL,
    slug text UNIQUE,
    logo text,
    metadata text,
    "createdAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS "session" (
    id text PRIMARY KEY,
    token text NOT NULL UNIQUE,
    "userId" text NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
    "expiresAt" timestamptz NOT NULL,
    "activeOrganizationId" text,
    "ipAddress" text,
    "userAgent" text,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "updatedAt" timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS member (
    id text PRIMARY KEY,
    "organizationId" text NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    "userId" text NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
    role text NOT NULL DEFAULT 'member',
    "createdAt" timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS member_user_org ON member ("userId", "organizationId");

-- walcast watches these two tables for live revocation: a DELETE must carry the whole
-- old row (organization, user, session token), which needs REPLICA IDENTITY FULL.
ALTER TABLE member REPLICA IDENTITY FULL;
ALTER TABLE "session" REPLICA IDENTITY FULL;
