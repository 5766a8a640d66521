"""Build ``paraphrases.jsonl``: prompt pairs a semantic cache must answer alike, or must not.

Fifty hand-written news facts, each in four forms (canonical, paraphrased, negated, one number
changed), are dropped into request templates (summarise, explain, headline, consequences, brief;
three wordings each). Deterministic; rerun after editing FACTS or TEMPLATES:

    python serving/data/build_paraphrases.py        # rewrites serving/data/paraphrases.jsonl
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "paraphrases.jsonl"
DEV_SHARE = 0.4  # facts (not pairs) go to dev or test, so no fact is seen on both sides

# intent -> three wordings of the same request; {c} is the fact clause
TEMPLATES = {
    "summarize": ["Summarize the news that {c}.", "Give me a short summary of the report that {c}.",
                  "Can you sum up the story saying that {c}?"],
    "explain": ["Explain why it matters that {c}.", "Why is it significant that {c}?",
                "What is the significance of the fact that {c}?"],
    "headline": ["Write a headline for a story reporting that {c}.",
                 "Suggest a headline for an article saying that {c}.", "Come up with a news headline: {c}."],
    "consequences": ["What are the likely consequences now that {c}?", "What could happen next, given that {c}?",
                     "Now that {c}, what effects should we expect?"],
    "brief": ["Write a short news brief: {c}.", "Draft a brief news item reporting that {c}.",
              "Compose a short news update saying that {c}."],
}
INTENTS = list(TEMPLATES)

# (canonical, paraphrase, negation, number change). Paraphrases reword freely and may write a
# number another way ("$40 million" / "40 million dollars", "3" / "three"); a few rewordings also
# change surface cues on purpose, as real users do ("decade" / "ten years", "without power" /
# "cut electricity"), and are expected to be missed by a guard that reads surface cues.
FACTS: list[tuple[str, str, str, str]] = [
    ("the city council approved a $40 million budget for road repairs on Tuesday",
     "city lawmakers on Tuesday signed off on 40 million dollars to fix local roads",
     "the city council did not approve a $40 million budget for road repairs on Tuesday",
     "the city council approved a $45 million budget for road repairs on Tuesday"),
    ("shares of Northwind Energy rose 12% after the company reported higher quarterly profits",
     "Northwind Energy stock climbed 12 percent once the firm posted bigger quarterly earnings",
     "shares of Northwind Energy did not rise 12% after the company reported higher quarterly profits",
     "shares of Northwind Energy rose 21% after the company reported higher quarterly profits"),
    ("heavy rain flooded 3 towns in the valley and officials told residents to stay home",
     "downpours caused flooding in three valley towns, and authorities urged people to remain indoors",
     "heavy rain flooded 3 towns in the valley but officials never told residents to stay home",
     "heavy rain flooded 8 towns in the valley and officials told residents to stay home"),
    ("scientists found that ocean temperatures rose by 0.5 degrees over the past decade",
     "researchers discovered that sea temperatures went up 0.5 degrees during the last decade",
     "scientists found that ocean temperatures did not rise by 0.5 degrees over the past decade",
     "scientists found that ocean temperatures rose by 1.5 degrees over the past decade"),
    ("the president said peace talks with the neighbouring country will resume in 2 weeks",
     "the president announced that negotiations with the neighbouring nation are set to restart in two weeks",
     "the president said peace talks with the neighbouring country won't resume in 2 weeks",
     "the president said peace talks with the neighbouring country will resume in 6 weeks"),
    ("the national team won the championship final 3-1 on Sunday",
     "on Sunday the national side beat its rival 3-1 to take the championship title",
     "the national team didn't win the championship final 3-1 on Sunday",
     "the national team won the championship final 4-1 on Sunday"),
    ("the hospital opened a new cancer ward with 60 beds this week",
     "this week the hospital launched a new 60-bed cancer unit",
     "the hospital has not opened a new cancer ward with 60 beds this week",
     "the hospital opened a new cancer ward with 90 beds this week"),
    ("the airline cancelled 200 flights because of a pilots' strike",
     "a strike by pilots forced the airline to scrap 200 flights",
     "the airline did not cancel 200 flights because of a pilots' strike",
     "the airline cancelled 350 flights because of a pilots' strike"),
    ("unemployment fell to 4.2% in March, the lowest level in a decade",
     "the jobless rate dropped to 4.2 percent in March, its lowest point in ten years",
     "unemployment did not fall to 4.2% in March, the lowest level in a decade",
     "unemployment fell to 3.8% in March, the lowest level in a decade"),
    ("the central bank raised interest rates by 0.25 percentage points",
     "the central bank increased its key rate by 0.25 percentage points",
     "the central bank did not raise interest rates by 0.25 percentage points",
     "the central bank raised interest rates by 0.5 percentage points"),
    ("police arrested 14 people after protests turned violent downtown",
     "14 protesters were detained by police when demonstrations in the city centre became violent",
     "police did not arrest 14 people after protests turned violent downtown",
     "police arrested 41 people after protests turned violent downtown"),
    ("the school district will hire 150 new teachers before September",
     "before September, the district plans to recruit 150 additional teachers",
     "the school district will not hire 150 new teachers before September",
     "the school district will hire 250 new teachers before September"),
    ("a magnitude 6.1 earthquake struck the coast early on Friday",
     "early Friday, an earthquake measuring 6.1 hit the coastal region",
     "a magnitude 6.1 earthquake did not strike the coast early on Friday",
     "a magnitude 7.1 earthquake struck the coast early on Friday"),
    ("the government plans to build 5,000 affordable homes next year",
     "next year the government intends to construct 5000 low-cost houses",
     "the government does not plan to build 5,000 affordable homes next year",
     "the government plans to build 15,000 affordable homes next year"),
    ("the tech company will cut 1,200 jobs as sales slow",
     "with sales slowing, the technology firm is set to eliminate 1,200 positions",
     "the tech company will not cut 1,200 jobs as sales slow",
     "the tech company will cut 2,100 jobs as sales slow"),
    ("the museum returned 7 stolen paintings to their owners",
     "seven stolen paintings were handed back to their owners by the museum",
     "the museum hasn't returned 7 stolen paintings to their owners",
     "the museum returned 17 stolen paintings to their owners"),
    ("the city will ban cars from the old town centre starting in 2026",
     "starting in 2026, vehicles will be barred from the historic city centre",
     "the city will not ban cars from the old town centre starting in 2026",
     "the city will ban cars from the old town centre starting in 2028"),
    ("the drug trial showed a 30% drop in heart attacks among patients",
     "patients in the drug study had 30 percent fewer heart attacks",
     "the drug trial showed no 30% drop in heart attacks among patients",
     "the drug trial showed a 13% drop in heart attacks among patients"),
    ("the river reached its highest level in 50 years after days of rain",
     "after several days of rainfall the river rose to its highest point in 50 years",
     "the river did not reach its highest level in 50 years after days of rain",
     "the river reached its highest level in 100 years after days of rain"),
    ("the mayor promised to plant 10,000 trees across the city",
     "the mayor pledged that 10,000 trees would be planted throughout the city",
     "the mayor never promised to plant 10,000 trees across the city",
     "the mayor promised to plant 1,000 trees across the city"),
    ("the carmaker recalled 80,000 vehicles over faulty brakes",
     "because of defective brakes, the automaker is recalling 80,000 cars",
     "the carmaker has not recalled 80,000 vehicles over faulty brakes",
     "the carmaker recalled 8,000 vehicles over faulty brakes"),
    ("the regional train line will run every 15 minutes from next month",
     "from next month, trains on the regional line will leave every 15 minutes",
     "the regional train line will not run every 15 minutes from next month",
     "the regional train line will run every 30 minutes from next month"),
    ("the senate passed the climate bill by 52 votes to 48",
     "the climate legislation cleared the senate on a 52-48 vote",
     "the senate did not pass the climate bill by 52 votes to 48",
     "the senate passed the climate bill by 55 votes to 45"),
    ("the wildfire has burned more than 20,000 acres of forest",
     "over 20,000 acres of woodland have been destroyed by the wildfire",
     "the wildfire has not burned more than 20,000 acres of forest",
     "the wildfire has burned more than 2,000 acres of forest"),
    ("the university received a $15 million gift for medical research",
     "a 15 million dollar donation for medical research was given to the university",
     "the university did not receive a $15 million gift for medical research",
     "the university received a $50 million gift for medical research"),
    ("inflation rose to 3.4% last month, driven by food and energy prices",
     "the inflation rate went up to 3.4 percent last month because of higher food and energy prices",
     "inflation did not rise to 3.4% last month, despite higher food and energy prices",
     "inflation rose to 4.3% last month, driven by food and energy prices"),
    ("the zoo welcomed 2 panda cubs born over the weekend",
     "two baby pandas were born at the zoo over the weekend",
     "the zoo has not welcomed 2 panda cubs born over the weekend",
     "the zoo welcomed 3 panda cubs born over the weekend"),
    ("the company's chief executive resigned after 9 years in the job",
     "after nine years at the helm, the firm's CEO stepped down",
     "the company's chief executive did not resign after 9 years in the job",
     "the company's chief executive resigned after 19 years in the job"),
    ("the storm left 40,000 homes without power overnight",
     "overnight the storm cut electricity to 40,000 households",
     "the storm did not leave 40,000 homes without power overnight",
     "the storm left 4,000 homes without power overnight"),
    ("the city's population grew by 8% in the latest census",
     "according to the latest census, the number of people living in the city increased 8 percent",
     "the city's population did not grow by 8% in the latest census",
     "the city's population grew by 18% in the latest census"),
    ("the footballer signed a 4-year contract with the club",
     "the club and the footballer agreed a four-year deal",
     "the footballer has not signed a 4-year contract with the club",
     "the footballer signed a 2-year contract with the club"),
    ("the minister announced that fuel taxes will be cut by 10 cents a litre",
     "fuel duty will fall by 10 cents per litre, the minister said",
     "the minister announced that fuel taxes will not be cut by 10 cents a litre",
     "the minister announced that fuel taxes will be cut by 5 cents a litre"),
    ("the factory will close in June, putting 300 workers out of a job",
     "300 employees will lose their jobs when the plant shuts down in June",
     "the factory will not close in June and put 300 workers out of a job",
     "the factory will close in June, putting 700 workers out of a job"),
    ("the marathon drew 25,000 runners despite the heat",
     "in spite of the heat, 25,000 people ran in the marathon",
     "the marathon did not draw 25,000 runners despite the heat",
     "the marathon drew 15,000 runners despite the heat"),
    ("the space agency launched a weather satellite on its 3rd attempt",
     "on its 3rd try, the space agency put a weather satellite into orbit",
     "the space agency did not launch a weather satellite on its 3rd attempt",
     "the space agency launched a weather satellite on its 5th attempt"),
    ("the court sentenced the former mayor to 6 years in prison for fraud",
     "the ex-mayor was given a 6-year prison sentence for fraud by the court",
     "the court did not sentence the former mayor to 6 years in prison for fraud",
     "the court sentenced the former mayor to 16 years in prison for fraud"),
    ("the bridge will be closed for repairs for 3 months",
     "repair work will shut the bridge for three months",
     "the bridge won't be closed for repairs for 3 months",
     "the bridge will be closed for repairs for 8 months"),
    ("the online retailer said holiday sales rose 20% from last year",
     "holiday sales at the online store were up 20 percent on the previous year, the company said",
     "the online retailer said holiday sales did not rise 20% from last year",
     "the online retailer said holiday sales rose 2% from last year"),
    ("the vaccine will be offered free to everyone over 65",
     "all people aged over 65 can get the vaccine at no cost",
     "the vaccine will not be offered free to everyone over 65",
     "the vaccine will be offered free to everyone over 75"),
    ("the league fined the club $250,000 for breaking spending rules",
     "for violating spending rules, the club was fined 250,000 dollars by the league",
     "the league did not fine the club $250,000 for breaking spending rules",
     "the league fined the club $25,000 for breaking spending rules"),
    ("the city recorded its hottest day ever at 41 degrees",
     "temperatures hit a record 41 degrees, the hottest day the city has ever seen",
     "the city did not record its hottest day ever at 41 degrees",
     "the city recorded its hottest day ever at 44 degrees"),
    ("the startup raised $8 million from investors to expand abroad",
     "investors put 8 million dollars into the startup to fund its international growth",
     "the startup has not raised $8 million from investors to expand abroad",
     "the startup raised $80 million from investors to expand abroad"),
    ("the ferry service will add 2 more boats during the summer",
     "during the summer months the ferry operator will put two extra boats into service",
     "the ferry service will not add 2 more boats during the summer",
     "the ferry service will add 5 more boats during the summer"),
    ("the library extended its opening hours to 10 p.m. on weekdays",
     "on weekdays the library will now stay open until 10 p.m.",
     "the library has not extended its opening hours to 10 p.m. on weekdays",
     "the library extended its opening hours to 9 p.m. on weekdays"),
    ("the health ministry reported 350 new flu cases this week",
     "this week, 350 new cases of influenza were reported by the health ministry",
     "the health ministry did not report 350 new flu cases this week",
     "the health ministry reported 530 new flu cases this week"),
    ("the government will raise the minimum wage to $15 an hour",
     "the minimum hourly wage is set to increase to 15 dollars under government plans",
     "the government will not raise the minimum wage to $15 an hour",
     "the government will raise the minimum wage to $12 an hour"),
    ("the orchestra cancelled 5 concerts after the conductor fell ill",
     "because the conductor became ill, the orchestra called off five concerts",
     "the orchestra did not cancel 5 concerts after the conductor fell ill",
     "the orchestra cancelled 15 concerts after the conductor fell ill"),
    ("the port handled a record 9 million containers last year",
     "last year a record nine million containers passed through the port",
     "the port did not handle a record 9 million containers last year",
     "the port handled a record 6 million containers last year"),
    ("the election turnout was 68%, up from the previous vote",
     "68 percent of voters took part in the election, more than in the last one",
     "the election turnout was 68%, which was not up from the previous vote",
     "the election turnout was 86%, up from the previous vote"),
    ("the rescue team saved 12 hikers trapped on the mountain",
     "twelve climbers stranded on the mountain were rescued by the team",
     "the rescue team could not save 12 hikers trapped on the mountain",
     "the rescue team saved 21 hikers trapped on the mountain"),
]


def _split(group: str) -> str:
    return "dev" if hashlib.sha256(group.encode()).digest()[0] < DEV_SHARE * 256 else "test"


def _fill(template: str, clause: str) -> str:
    text = template.format(c=clause)
    return text[0].upper() + text[1:]


def build() -> list[dict]:
    """Seven pairs per fact: three paraphrases (hit), two negations and two number changes (miss)."""
    rows = []
    for i, (fact, alt, neg, num) in enumerate(FACTS):
        group = f"f{i + 1:02d}"
        intent = INTENTS[i % len(INTENTS)]
        t0, t1, t2 = TEMPLATES[intent]
        a = _fill(t0, fact)
        pairs = [
            ("paraphrase", "reworded+reframed", _fill(t1, alt)),
            ("paraphrase", "reworded", _fill(t0, alt)),
            ("paraphrase", "reframed", _fill(t2, fact)),
            ("negation", "same-frame", _fill(t0, neg)),
            ("negation", "reframed", _fill(t1, neg)),
            ("number", "same-frame", _fill(t0, num)),
            ("number", "reframed", _fill(t2, num)),
        ]
        for k, (kind, variant, b) in enumerate(pairs):
            rows.append({"id": f"{group}-{k + 1}", "group": group, "split": _split(group), "intent": intent,
                         "kind": kind, "variant": variant, "expect": "hit" if kind == "paraphrase" else "miss",
                         "a": a, "b": b})
    return rows


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("paraphrase", "negation", "number")}
    print(f"wrote {len(rows)} pairs to {OUT}: {kinds}, dev {sum(r['split'] == 'dev' for r in rows)}")


if __name__ == "__main__":
    main()
