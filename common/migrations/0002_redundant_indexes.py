from django.db import migrations

from common.indexes import DropLikeIndexes


class Migration(migrations.Migration):
    """The token digest's LIKE twin: a token is looked up only by its digest (common.indexes)."""

    dependencies = [("common", "0001_api_token")]

    operations = [DropLikeIndexes("common", [("apitoken", "digest")])]
