"""Services after the endpoints of the paper's Table 3 (seed 001): employee data, expenditures by
date, lecturer data; and one with structured input. Each run of `process()` appends the service's
name to the file named by MICROSWARM_TEST_MARKS, so a test can tell that a refused call (a 400)
dispatched nothing."""
from __future__ import annotations

import datetime
import os

from pydantic import BaseModel, Field

from microcores import MicroCore, NoData


def _mark(service: str) -> None:
    path = os.environ.get("MICROSWARM_TEST_MARKS")
    if path:
        with open(path, "a") as f:
            f.write(service + "\n")


EMPLOYEES = {1: ("Made Suta", "Informatics"), 7: ("Ni Luh Ayu", "Finance"), 12: ("Komang Ari", "Library")}
LECTURERS = {3: ("Dr. Wayan Sudira", "Computer Science"), 9: ("Dr. Putu Sari", "Mathematics")}
EXPENDITURES = {datetime.date(2023, 12, 29): [("printing", 150000.0), ("travel", 2250000.0)],
                datetime.date(2024, 1, 2): [("stationery", 87500.0)]}


class IdIn(BaseModel):
    id: int = Field(ge=1, description="a positive id")


class PersonOut(BaseModel):
    id: int
    name: str
    unit: str


class EmployeeData(MicroCore[IdIn, PersonOut]):
    """An employee's record by id (the paper's /pegawai/data)."""

    name = "pegawai.data"
    version = "1"
    timeout = 10.0

    def process(self, data: IdIn) -> PersonOut:
        _mark(self.name)
        rec = EMPLOYEES.get(data.id)
        if rec is None:
            raise NoData(f"no employee with id {data.id}", field="id")
        return PersonOut(id=data.id, name=rec[0], unit=rec[1])


class LecturerData(MicroCore[IdIn, PersonOut]):
    """A lecturer's record by id (the paper's /dosen/data)."""

    name = "dosen.data"
    version = "1"
    timeout = 10.0

    def process(self, data: IdIn) -> PersonOut:
        _mark(self.name)
        rec = LECTURERS.get(data.id)
        if rec is None:
            raise NoData(f"no lecturer with id {data.id}", field="id")
        return PersonOut(id=data.id, name=rec[0], unit=rec[1])


class DateIn(BaseModel):
    date: datetime.date = Field(description="the day, YYYY-MM-DD")


class Item(BaseModel):
    what: str
    amount: float


class ExpenditureOut(BaseModel):
    date: datetime.date
    items: list[Item]
    total: float


class Expenditure(MicroCore[DateIn, ExpenditureOut]):
    """What was spent on a day (the paper's /keuangan/pengeluaran)."""

    name = "keuangan.pengeluaran"
    version = "1"
    timeout = 10.0

    def process(self, data: DateIn) -> ExpenditureOut:
        _mark(self.name)
        items = EXPENDITURES.get(data.date)
        if not items:
            raise NoData(f"no expenditure on {data.date.isoformat()}", field="date")
        return ExpenditureOut(date=data.date, items=[Item(what=w, amount=a) for w, a in items],
                              total=sum(a for _, a in items))


class ReportIn(BaseModel):
    unit: str = Field(min_length=1, max_length=40, description="the unit's name")
    year: int = Field(ge=2000, le=2100)
    amounts: list[float] = Field(default_factory=list, max_length=100)


class ReportOut(BaseModel):
    unit: str
    year: int
    total: float


class Report(MicroCore[ReportIn, ReportOut]):
    """A unit's yearly total from a list of amounts (structured input: POST only)."""

    name = "keuangan.laporan"
    version = "1"
    pure = True
    timeout = 10.0

    def process(self, data: ReportIn) -> ReportOut:
        _mark(self.name)
        return ReportOut(unit=data.unit, year=data.year, total=sum(data.amounts))
