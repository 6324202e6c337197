"""Putting a run to work: prediction on new images, the HTML report, the advisor and the doctor.

Everything here reads what ``comparison`` wrote into a run folder and replays it."""
