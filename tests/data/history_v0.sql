-- The history schema as release 0.1.0 created it (Base.metadata.create_all, no Alembic).
-- {timestamp} is DATETIME on SQLite and TIMESTAMP WITH TIME ZONE on PostgreSQL.
CREATE TABLE transcripts (
	id VARCHAR(32) NOT NULL,
	owner VARCHAR(64) NOT NULL,
	text TEXT NOT NULL,
	language VARCHAR(8),
	duration FLOAT,
	created_at {timestamp} NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_transcripts_owner ON transcripts (owner);
CREATE TABLE images (
	id VARCHAR(32) NOT NULL,
	owner VARCHAR(64) NOT NULL,
	filename VARCHAR(64) NOT NULL,
	prompt TEXT NOT NULL,
	negative_prompt TEXT,
	model VARCHAR(128) NOT NULL,
	model_reason TEXT NOT NULL,
	seed BIGINT NOT NULL,
	steps INTEGER NOT NULL,
	guidance_scale FLOAT NOT NULL,
	scheduler VARCHAR(32) NOT NULL,
	width INTEGER NOT NULL,
	height INTEGER NOT NULL,
	parameters JSON NOT NULL,
	bytes BIGINT NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	created_at {timestamp} NOT NULL,
	transcript_id VARCHAR(32),
	PRIMARY KEY (id),
	UNIQUE (filename),
	FOREIGN KEY(transcript_id) REFERENCES transcripts (id) ON DELETE SET NULL
);
CREATE INDEX ix_images_created_at ON images (created_at);
CREATE INDEX ix_images_model ON images (model);
CREATE INDEX ix_images_owner ON images (owner);
CREATE INDEX ix_images_transcript_id ON images (transcript_id);
INSERT INTO transcripts VALUES ('{transcript_id}', '{owner}', 'a castle at dawn', 'en', 2.5, '2026-11-01 08:00:00.000000');
INSERT INTO images VALUES ('{image_id}', '{owner}', '{image_id}.png', 'a castle at dawn', NULL, 'tiny-art', 'asked for', 4294967295, 4, 7.0, 'euler_a', 64, 64, '{{"seed": 4294967295}}', 13, '{sha256}', '2026-11-01 08:00:01.000000', '{transcript_id}');
