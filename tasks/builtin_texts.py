"""A small built-in English text set for calibration and probing when a caller passes none.

Plain prose in the register of the default news corpus, written for this purpose and not taken
from any evaluation set: about 1,000 SmolLM2 tokens. Steps record when they fell back to it;
a pipeline should pass its own calibration split instead.

    from tasks.builtin_texts import BUILTIN_TEXTS
    windows = probe_windows(lm, BUILTIN_TEXTS, n=8, length=64)
"""

BUILTIN_TEXTS: tuple[str, ...] = (
    "The city council met on Tuesday evening to debate the new budget. After several hours of discussion, "
    "members voted to increase spending on schools and road repairs, while cutting the cost of the new "
    "parking garage that had been planned for the downtown area.",
    "Shares of the company rose sharply in early trading after it reported quarterly profits well above "
    "what analysts had expected. The chief executive said demand for its products remained strong in "
    "Europe and Asia, although costs for materials and shipping continued to climb.",
    "Heavy rain caused flooding in several towns along the river over the weekend. Officials urged "
    "residents to stay at home, and emergency crews worked through the night to rescue families whose "
    "houses were surrounded by water. Forecasters expect more storms later this week.",
    "Scientists published a new study on ocean temperatures, finding that the surface of the sea has "
    "warmed faster in the past decade than in the previous fifty years. The researchers said the change "
    "could affect fish populations, coral reefs and the weather on land.",
    "The president told reporters that talks with the neighbouring country would continue next week in "
    "the capital. Both sides hope to reach an agreement on trade and border security before the end of "
    "the year, but several important questions remain open.",
    "The museum will reopen next month after a two-year renovation that added new galleries, a library "
    "and a small theatre. Visitors will be able to see paintings that have not been shown to the public "
    "for decades, along with a collection of letters written by the artist.",
    "The local hospital announced that it would hire forty new nurses this spring to cope with a rise in "
    "patients during the winter months. A spokesman said waiting times in the emergency department had "
    "grown longer, and that the new staff should help to bring them down again.",
    "Farmers in the northern valley say the dry summer has cut their harvest of wheat and corn by almost a "
    "third. Many of them are asking the government for help, while others have started to plant crops "
    "that need less water and can survive long periods without rain.",
    "The national football team won its third match in a row on Saturday, beating its rivals by two goals "
    "to one in front of a crowd of more than sixty thousand people. The coach praised his young players "
    "and said the team was ready for the tournament next month.",
    "A new railway line connecting the two largest cities in the region opened on Monday. The trip now "
    "takes less than an hour, compared with nearly three hours by car, and officials hope the service "
    "will reduce traffic on the busy highway between them.",
    "The central bank kept interest rates unchanged at its meeting on Thursday, saying that inflation had "
    "slowed but remained above its target. Economists expect the bank to lower rates later in the year "
    "if prices continue to rise more slowly and unemployment stays low.",
    "Police are asking for help from the public after a number of bicycles were stolen from the university "
    "campus over the past two weeks. Students have been told to use strong locks and to leave their bikes "
    "only in the areas that are watched by security cameras.",
    "The software company said it would open a new office in the city and create about five hundred jobs "
    "over the next three years. The mayor welcomed the news and said the decision showed that the region "
    "could attract investment from some of the largest firms in the industry.",
    "Thousands of people gathered in the main square on Sunday to celebrate the start of the annual summer "
    "festival. The programme includes concerts, films and street theatre, and most of the events are free "
    "for anyone who wishes to attend during the ten days of the festival.",
    "Doctors say that regular exercise and a balanced diet remain the best ways to lower the risk of heart "
    "disease. A report published this week found that only one adult in four takes enough exercise, and "
    "that the number has barely changed since the last survey five years ago.",
    "The airline cancelled dozens of flights on Friday after a computer problem disrupted its booking and "
    "check-in systems. Passengers waited for hours at airports across the country, and the company said "
    "it would offer refunds or new tickets to everyone whose journey had been affected.",
    "Engineers have begun work on a bridge that will replace the old wooden crossing over the river, which "
    "was closed last year after inspectors found serious damage. The new bridge is expected to open in two "
    "years and will include a separate path for people on foot and on bicycles.",
    "The school board approved a plan to start classes thirty minutes later next autumn, after studies "
    "suggested that teenagers learn better when they get more sleep. Some parents support the change, but "
    "others worry that it will make it harder to organise transport and sports after school.",
    "Researchers at the university have developed a cheaper way to store energy from wind and solar farms, "
    "using large tanks of salt water instead of expensive batteries. They say the system could be ready "
    "for commercial use within five years if tests on a larger scale are successful.",
    "The writer, who died on Wednesday at the age of eighty-seven, published more than twenty novels and "
    "was best known for her stories about life in small coastal towns. Her books were translated into many "
    "languages, and several of them were made into films and television series.",
)
