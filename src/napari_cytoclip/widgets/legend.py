"""A searchable region legend: colour swatch, name, acronym and share of the section."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QLineEdit, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

REGION_ID_ROLE = Qt.ItemDataRole.UserRole


class RegionLegend(QWidget):
    """Click a region to paint with it; type to filter by name or acronym."""

    region_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search regions (name or acronym)")
        self.search.setClearButtonEnabled(True)
        self.list = QListWidget()
        self.list.setToolTip("Click a region to paint with it")
        self.list.setMinimumHeight(120)
        self.list.setMaximumHeight(220)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(3)
        layout.addWidget(self.search)
        layout.addWidget(self.list)
        self.search.textChanged.connect(self.apply_filter)
        self.list.itemClicked.connect(self._clicked)

    def set_regions(self, regions: Sequence, labels: np.ndarray | None = None,
                    taught: dict[int, int] | None = None) -> None:
        """List ``regions``; with ``labels``, show each one's share of the labelled tiles; with ``taught``
        (region id -> cells), how many taught cells each has."""
        self.list.clear()
        total = int((labels > 0).sum()) if labels is not None else 0
        for r in regions:
            text = r.name if not r.acronym or r.acronym == r.name else f"{r.name}  ({r.acronym})"
            if total:
                share = 100.0 * int((labels == r.id).sum()) / total
                text += f"   {share:.1f}%" if share else "   -"
            if taught and taught.get(int(r.id)):
                text += f"   taught {taught[int(r.id)]}"
            item = QListWidgetItem(_swatch(r.color), text)
            item.setData(REGION_ID_ROLE, int(r.id))
            item.setToolTip(f"id {r.id}: {r.description}" if r.description else f"id {r.id}")
            self.list.addItem(item)
        self.apply_filter(self.search.text())

    def visible_ids(self) -> list[int]:
        return [int(self.list.item(i).data(REGION_ID_ROLE)) for i in range(self.list.count())
                if not self.list.item(i).isHidden()]

    def apply_filter(self, text: str) -> None:
        needle = (text or "").strip().lower()
        for i in range(self.list.count()):
            item = self.list.item(i)
            item.setHidden(bool(needle) and needle not in item.text().lower())

    def click_region(self, region_id: int) -> None:
        """What a click on the region's row does (for keyboard users and tests)."""
        self.region_clicked.emit(int(region_id))

    def _clicked(self, item: QListWidgetItem) -> None:
        self.region_clicked.emit(int(item.data(REGION_ID_ROLE)))


def _swatch(color: str, size: int = 14) -> QIcon:
    pix = QPixmap(size, size)
    pix.fill(QColor(color))
    return QIcon(pix)
