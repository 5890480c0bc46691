"""Create the keyring table that holds each tenant's wrapped DEKs.

Revision ID: 0002
Revises: 0001
"""

from alembic_ext import op  # alembic.op, typed for the encryption operations

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_keyring_table()


def downgrade() -> None:
    # Dropping the table deletes every DEK: run it only after every encrypted
    # column was decrypted (revision 0003's downgrade does that).
    op.drop_keyring_table()
