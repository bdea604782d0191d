"""What an error line may show (common/errors.py)."""
import pytest

from alterrec_dist.common.errors import hide_credentials


@pytest.mark.parametrize("text, shown", [
    ("http://alice:s3cret@host:5000", "http://***@host:5000"),
    ("API request to https://alice:s3cret@mlflow.example.com/api/2.0 failed", "API request to "
     "https://***@mlflow.example.com/api/2.0 failed"),
    ("http://alice:s3@cret@host/x", "http://***@host/x"),  # a raw @ in the secret: hidden to the last one
    ("s3://AKIAEXAMPLE:wJal/rX/K7@bucket/k", "s3://***@bucket/k"),  # a / in the secret (AWS keys hold them)
    ("https://token@host/x", "https://***@host/x"),
    ("'http://u:p@h' and 'http://v:q@i'", "'http://***@h' and 'http://***@i'"),  # each URI of a line
])
def test_credentials_in_a_uri_are_hidden(text, shown):
    assert hide_credentials(text) == shown


@pytest.mark.parametrize("text", ["databricks://profile", "databricks://scope:prefix", "file:///tmp/a@b",
                                  "sqlite:///a@b.db", "s3://bucket/key@v1", "gs://my-bucket.example.com/d",
                                  "http://host/a@b", "?x=a@b", "mail a@b.c", "http://host:5000/api"])
def test_uris_without_credentials_are_shown_as_they_are(text):
    assert hide_credentials(text) == text
