"""The query search as Beam transforms: queries -> extraction (shared with the index build) ->
retrieval against the index, opened once per worker -> one JSON record per query."""

from __future__ import annotations

import json
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from delf_retrieval.corpus.inputs import read_image
from delf_retrieval.extraction.extractor import Extractor
from delf_retrieval.extraction.visualize import write_query_picture
from delf_retrieval.index import layout
from delf_retrieval.landmarks import recognition
from delf_retrieval.model import delf
from delf_retrieval.query import retrieval
from transforms.extract import DEAD_LETTER, ExtractImages, with_accelerator


class QueryImage(NamedTuple):
    """A query as given (``uri``) and its position in the list (``rank``), which orders the results."""

    uri: str
    rank: int


class SearchIndex(beam.DoFn):
    """(QueryImage, Features, facts) -> a JSON line {"rank", "query", "matches", "error"}."""

    def __init__(self, index: str, config, open_options: dict, visualize: str | None = None, visualize_top: int = 5):
        self.index = index
        self.config = config
        self.open_options = open_options
        self.visualize = visualize
        self.visualize_top = visualize_top
        self.retriever = None
        self.recognizer = None
        self.extractor = None
        self.answered = Metrics.counter("delf", "queries_answered")

    def setup(self):
        self.retriever = retrieval.open_index(self.index, self.config, **self.open_options)
        self.recognizer = recognition.load(self.index)  # None: the index has no landmarks

    def process(self, element):
        query, features, _ = element
        try:
            result = self.retriever.search(features)
        except Exception as e:  # noqa: BLE001 - one query's failure is its record; the others are answered
            yield json.dumps({"rank": query.rank, "query": query.uri, "matches": [],
                              "error": f"search/internal_error: {type(e).__name__}: {e}"})
            return
        self.answered.inc()
        if self.visualize:
            self._picture(query, result.matches[: self.visualize_top])
        landmark = self.recognizer.recognize(result.matches).to_json() if self.recognizer is not None else None
        yield json.dumps({"rank": query.rank, "query": query.uri, "matches": [m.to_json() for m in result.matches],
                          "error": None, "notes": list(result.notes), "landmark": landmark})

    def _picture(self, query: QueryImage, matches) -> None:
        if self.extractor is None:

            model_config, extraction_config = retrieval.index_configs(self.retriever.reader.manifest)
            self.extractor = Extractor(delf.load(model_config), extraction_config)
        image = read_image(query.uri)
        write_query_picture(self.visualize, query.rank, query.uri, image, self.extractor.score_map(image), matches)


def failed_query(record: dict, ranks: dict) -> str:
    return json.dumps({"rank": ranks[record["uri"]], "query": record["uri"], "matches": [],
                       "error": f"{record['stage']}/{record['reason']}: {record.get('error')}"})


class SearchQueries(beam.PTransform):
    """Queries (a list of paths/URLs) -> ``output``, a JSON-lines file with one record per query
    (failed queries carry their error and no matches). ``accelerator``: the Beam accelerator hint of
    the extraction and the search after it (``with_accelerator``)."""

    def __init__(self, queries: list[str], index: str, config, output: str, image_shortlist: str = "auto",
                 shortlist_min_images: int = 50_000, shortlist_size: int = 1000, visualize: str | None = None,
                 visualize_top: int = 5, max_batch_size: int = 8, fetch=None, accelerator: str | None = None):
        super().__init__()
        self.queries = list(queries)
        self.index = index
        self.config = config
        self.output = output
        self.open_options = {"image_shortlist": image_shortlist, "shortlist_min_images": shortlist_min_images,
                             "shortlist_size": shortlist_size}
        self.visualize = visualize
        self.visualize_top = visualize_top
        self.max_batch_size = max_batch_size
        self.fetch = fetch  # a FetchConfig: how queries are read
        self.accelerator = accelerator

    def expand(self, pbegin):
        # Queries are extracted exactly as the index was built.
        model_config, extraction_config = retrieval.index_configs(layout.read_manifest(self.index))
        ranks = {uri: rank for rank, uri in reversed(list(enumerate(self.queries)))}
        extracted = (
            pbegin
            | "Queries" >> beam.Create([QueryImage(uri, rank) for rank, uri in enumerate(self.queries)])
            | "Spread" >> beam.Reshuffle()
            | "Extract" >> with_accelerator(ExtractImages(model_config, extraction_config,
                                                          max_batch_size=self.max_batch_size, fetch=self.fetch),
                                            self.accelerator)
        )
        answered = extracted["features"] | "Search" >> with_accelerator(beam.ParDo(
            SearchIndex(self.index, self.config, self.open_options, self.visualize, self.visualize_top)),
            self.accelerator)
        failed = extracted[DEAD_LETTER] | "Failed" >> beam.Map(failed_query, ranks)
        return ((answered, failed) | "Records" >> beam.Flatten()
                | "Write" >> beam.io.WriteToText(self.output, num_shards=1, shard_name_template=""))
