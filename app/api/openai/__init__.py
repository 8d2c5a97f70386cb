"""The OpenAI-compatible dialect of the API: the same services as the native routes, spoken in the shapes
and ids the `openai` SDK expects (`file-7`, `ftjob-3`, `ft:<backbone>:<task>:<version>`)."""
