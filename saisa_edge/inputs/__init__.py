"""Where a request enters: image preprocessing, conversation templates, prompt tokenisation."""
