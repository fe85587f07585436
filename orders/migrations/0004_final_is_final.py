from django.db import migrations

FUNCTION = """
CREATE FUNCTION order_refuse_undoing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'order %: % cannot become %: a confirmed, failed or cancelled order is final',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'integrity_constraint_violation';
END $$
"""
TRIGGER = """
CREATE TRIGGER order_final_is_final BEFORE UPDATE ON orders_order FOR EACH ROW
WHEN (NEW.id <> OLD.id OR (OLD.status IN ('confirmed', 'failed', 'cancelled') AND NEW.status <> OLD.status))
EXECUTE FUNCTION order_refuse_undoing()
"""


class Migration(migrations.Migration):
    """An order's outcome is final, for every role (saga migration 0013 says why; a table's
    owner alone may drop or disable the trigger)."""

    dependencies = [("orders", "0003_redundant_indexes")]

    operations = [
        migrations.RunSQL(
            sql=[FUNCTION, TRIGGER],
            reverse_sql=["DROP TRIGGER order_final_is_final ON orders_order", "DROP FUNCTION order_refuse_undoing()"],
        ),
    ]
