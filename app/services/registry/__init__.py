"""The registry of tasks and their versions: publishing, listing, PEFT import and export, OpenAI
model names."""
