from django.db import migrations

# Refused in PostgreSQL, for every role: a table's owner alone may drop or disable a trigger,
# and no process role owns anything (orders_project.db_roles).
FUNCTION = """
CREATE FUNCTION saga_refuse_undoing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'saga %: % (pivot %) cannot become % (pivot %): what a saga finished or committed is final',
        OLD.id, OLD.status, OLD.pivot_committed_at, NEW.status, NEW.pivot_committed_at
        USING ERRCODE = 'integrity_constraint_violation';
END $$
"""
TRIGGER = """
CREATE TRIGGER saga_finished_is_final BEFORE UPDATE ON saga_sagainstance FOR EACH ROW
WHEN (
    NEW.id <> OLD.id
    OR (OLD.status IN ('completed', 'compensated') AND NEW.status <> OLD.status)
    OR (OLD.pivot_committed_at IS NOT NULL AND NEW.pivot_committed_at IS DISTINCT FROM OLD.pivot_committed_at)
)
EXECUTE FUNCTION saga_refuse_undoing()
"""


class Migration(migrations.Migration):
    """A saga that finished stays finished, and a committed pivot stays committed.

    The coordinator decides from the store alone: a saga `running` with no pivot and a step
    past its deadline is compensated by the next sweep, refund included. Whoever could write
    the store (the web's or the orders worker's database role) could therefore turn a
    confirmed, paid order's saga back to that and have the system refund it. The trigger's
    condition is evaluated without calling the function, so the usual update pays nothing
    measurable; the function runs only to refuse.
    """

    dependencies = [("saga", "0012_analyze_less")]

    operations = [
        migrations.RunSQL(
            sql=[FUNCTION, TRIGGER],
            reverse_sql=[
                "DROP TRIGGER saga_finished_is_final ON saga_sagainstance",
                "DROP FUNCTION saga_refuse_undoing()",
            ],
        ),
    ]
