"""Speech to text in one process, no Ray: features, chunking, tokens, the decoder and its passes, word
alignment, the merge of a file's chunks, and the one Engine that the batch job, the endpoint and the
evaluation helpers all call."""
