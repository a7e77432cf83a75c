"""Word lists for tinyworld: topic vocabularies, generic template words, names, places, calendar words.

Topic entries are compact strings, expanded by ``world.py``:

* nouns: ``"chef"`` (regular plural), ``"knife:knives"`` (explicit plural), ``"~garlic"`` (uncountable:
  no plural, never with a/an or a numeral);
* places: ``"kitchen"`` (used as "in the kitchen") or ``"at:concert"`` (preposition given);
* verbs: ``"simmer"`` (regular), ``"chop*"`` (final consonant doubles: chopped, chopping),
  ``"sing:sang:sung"`` (irregular past and past participle);
* adjectives: ``"culinary"`` (not gradable), ``"spicy:spicier"`` (comparative given),
  ``"savory:+"`` (comparative "more savory").

Every surface form of a topic word belongs to exactly one topic, and none is a generic template word,
a person name, a place name or a calendar word (checked by the tests).
"""

from __future__ import annotations

# name -> dict(description, agents, things, places, verbs, adjs)
TOPIC_DATA: dict[str, dict[str, str]] = {
    "cooking": dict(
        description="Preparing food: chefs, kitchens, recipes, ingredients and cooking methods.",
        agents="chef baker butcher waiter caterer",
        things="sauce oven recipe ~garlic onion ~broth soup skillet saucepan spatula ~dough pastry omelette "
        "casserole ladle spice",
        places="kitchen bakery restaurant",
        verbs="simmer chop* stir* bake fry roast season knead marinate whisk grill",
        adjs="spicy:spicier salty:saltier crispy:crispier savory:+ delicious:+ culinary",
    ),
    "astronomy": dict(
        description="Observing the sky: astronomers, telescopes, planets, stars and galaxies.",
        agents="astronomer astronaut cosmologist stargazer astrophysicist",
        things="telescope galaxy comet nebula:nebulae planet asteroid supernova orbit quasar constellation "
        "eclipse meteor moon star satellite",
        places="observatory planetarium at:spaceport",
        verbs="orbit launch observe magnify catalogue eclipse",
        adjs="lunar solar celestial cosmic orbital galactic stellar",
    ),
    "medicine": dict(
        description="Health care: doctors, nurses, patients, diagnoses, drugs and hospitals.",
        agents="doctor nurse surgeon patient pharmacist paramedic",
        things="vaccine stethoscope prescription symptom fever diagnosis:diagnoses injection bandage syringe "
        "tablet antibiotic infection virus:viruses thermometer",
        places="hospital clinic pharmacy",
        verbs="diagnose prescribe vaccinate operate bandage inject treat heal sterilize",
        adjs="clinical medical surgical feverish:+ contagious:+ chronic",
    ),
    "finance": dict(
        description="Money: bankers, investors, loans, stocks, budgets and taxes.",
        agents="banker investor accountant trader auditor broker shareholder",
        things="stock bond dividend loan mortgage portfolio budget invoice currency profit deficit cheque "
        "ledger tax",
        places="bank treasury brokerage",
        verbs="invest audit lend:lent:lent deposit borrow insure finance",
        adjs="fiscal monetary profitable:+ financial bankrupt wealthy:wealthier",
    ),
    "programming": dict(
        description="Writing software: programmers, compilers, bugs, databases and algorithms.",
        agents="programmer developer coder hacker maintainer",
        things="compiler function variable bug ~software algorithm database keyboard server laptop ~syntax "
        "debugger repository array pointer",
        places="datacenter at:hackathon at:startup",
        verbs="compile debug* refactor deploy encrypt code recompile",
        adjs="recursive binary asynchronous buggy:buggier modular",
    ),
    "weather": dict(
        description="The weather: forecasters, storms, rain, snow, fog and wind.",
        agents="meteorologist forecaster climatologist weatherman:weathermen",
        things="storm ~thunder ~lightning ~drizzle ~hail blizzard tornado:tornadoes hurricane forecast "
        "umbrella breeze ~fog cloud ~humidity ~frost ~snow ~rain raincoat rainbow",
        places="fog storm rain snow",
        verbs="predict freeze:froze:frozen thaw",
        adjs="rainy:rainier stormy:stormier foggy:foggier humid:+ chilly:chillier windy:windier "
        "sunny:sunnier cloudy:cloudier",
    ),
    "music": dict(
        description="Making music: musicians, instruments, orchestras, melodies and concerts.",
        agents="musician pianist violinist composer conductor drummer singer cellist",
        things="piano violin guitar symphony melody orchestra chord concerto drum cello trumpet sonata "
        "lyric choir rhythm",
        places="at:concert at:opera conservatory",
        verbs="compose rehearse sing:sang:sung strum* hum* tune harmonize",
        adjs="melodic musical harmonic acoustic rhythmic",
    ),
    "law": dict(
        description="The law: lawyers, judges, courts, lawsuits, verdicts and contracts.",
        agents="lawyer judge attorney prosecutor juror defendant plaintiff",
        things="verdict lawsuit contract statute testimony subpoena appeal warrant affidavit jury",
        places="courtroom courthouse tribunal",
        verbs="sue prosecute testify appeal indict acquit* litigate",
        adjs="legal judicial guilty:+ innocent:+ lawful criminal",
    ),
    "gardening": dict(
        description="Gardens: gardeners, flowers, hedges, lawns and garden tools.",
        agents="gardener landscaper florist horticulturist arborist",
        things="rose tulip hedge trowel ~compost seedling flowerbed lawn shrub weed daisy fern hose rake "
        "~mulch orchid",
        places="greenhouse garden allotment",
        verbs="prune plant weed mow:mowed:mown rake transplant fertilize mulch",
        adjs="blooming leafy:leafier fragrant:+ ornamental perennial",
    ),
    "chemistry": dict(
        description="Chemistry: chemists, molecules, acids, reactions and laboratory glassware.",
        agents="chemist alchemist biochemist toxicologist",
        things="molecule atom beaker flask solvent catalyst acid reagent isotope polymer electron titration "
        "pipette compound",
        places="laboratory lab",
        verbs="distill titrate oxidize synthesize dissolve ionize neutralize",
        adjs="acidic:+ alkaline volatile:+ toxic:+ molecular chemical",
    ),
    "aviation": dict(
        description="Flying: pilots, airplanes, runways, airports and cockpits.",
        agents="pilot aviator copilot airman:airmen skydiver",
        things="airplane propeller cockpit runway jet glider helicopter altimeter fuselage airliner "
        "~turbulence parachute wing biplane",
        places="at:airport at:airfield hangar",
        verbs="fly:flew:flown glide hover refuel parachute pilot airlift",
        adjs="aerial supersonic airborne aeronautical",
    ),
    "fashion": dict(
        description="Clothing and style: tailors, dresses, fabrics, catwalks and boutiques.",
        agents="tailor seamstress stylist couturier dressmaker",
        things="dress gown scarf:scarves jacket blouse necklace handbag ~velvet ~silk ~denim catwalk hemline "
        "sequin tuxedo wardrobe corset",
        places="boutique atelier showroom",
        verbs="tailor sew:sewed:sewn hem* embroider accessorize drape",
        adjs="stylish:+ elegant:+ fashionable:+ glamorous:+ trendy:trendier chic",
    ),
    "geology": dict(
        description="Rocks and the Earth: geologists, volcanoes, minerals, fossils and earthquakes.",
        agents="geologist seismologist volcanologist prospector miner",
        things="volcano:volcanoes fossil ~granite ~basalt quartz crystal mineral ~magma ~lava earthquake "
        "boulder sediment ~limestone canyon glacier geyser stalactite",
        places="quarry cavern crater",
        verbs="erode quarry fossilize crystallize prospect",
        adjs="volcanic tectonic seismic molten igneous rocky:rockier sedimentary",
    ),
    "history": dict(
        description="The past: historians, empires, dynasties, manuscripts and ruins.",
        agents="historian archaeologist archivist chronicler emperor pharaoh",
        things="empire dynasty manuscript artifact relic monument chronicle parchment scroll revolution "
        "conquest pyramid crusade antiquity archive",
        places="museum fortress citadel",
        verbs="excavate chronicle conquer unearth archive colonize commemorate",
        adjs="ancient:+ medieval historical imperial archaeological prehistoric",
    ),
    "painting": dict(
        description="Painting: painters, canvases, brushes, portraits and galleries.",
        agents="painter artist illustrator muralist portraitist curator",
        things="canvas easel paintbrush palette portrait landscape watercolor mural sketch pigment fresco "
        "masterpiece ~varnish ~charcoal",
        places="gallery studio",
        verbs="paint sketch varnish illustrate daub stipple",
        adjs="impressionist abstract colorful:+ vivid:+ pastel artistic:+",
    ),
    "railways": dict(
        description="Railways: trains, locomotives, tracks, stations and timetables.",
        agents="stationmaster signalman:signalmen trainspotter railwayman:railwaymen brakeman:brakemen",
        things="train locomotive carriage railway timetable ticket track ~freight caboose rail boxcar engine "
        "junction siding monorail",
        places="station depot at:platform",
        verbs="shunt derail uncouple electrify signal",
        adjs="punctual:+ intercity diesel",
    ),
    "sailing": dict(
        description="Sailing: sailors, yachts, masts, anchors and harbors.",
        agents="sailor captain navigator skipper deckhand helmsman:helmsmen",
        things="yacht sail mast anchor rudder hull compass keel buoy regatta dinghy tiller lighthouse oar "
        "mainsail",
        places="harbor marina at:dock",
        verbs="sail anchor moor capsize hoist navigate steer",
        adjs="nautical seaworthy:+ maritime coastal",
    ),
    "farming": dict(
        description="Farms: farmers, tractors, crops, barns and livestock.",
        agents="farmer shepherd rancher farmhand cowherd",
        things="tractor barn ~wheat ~barley cow pig plough ~hay silo pasture scarecrow crop goat haystack "
        "orchard ~manure",
        places="farm farmyard ranch",
        verbs="harvest plough milk sow:sowed:sown irrigate herd shear:sheared:shorn",
        adjs="organic agricultural rural fertile:+ arable muddy:muddier",
    ),
    "cinema": dict(
        description="Films: actors, directors, screenplays, premieres and cinemas.",
        agents="actor actress director screenwriter filmmaker cameraman:cameramen stuntman:stuntmen producer",
        things="film movie screenplay premiere sequel trailer soundtrack projector blockbuster documentary "
        "~popcorn stunt reel subtitle",
        places="cinema theater multiplex",
        verbs="film direct premiere screen dub* storyboard",
        adjs="cinematic theatrical dramatic:+ suspenseful:+ widescreen",
    ),
    "chess": dict(
        description="Chess: grandmasters, pawns, gambits, checkmates and tournaments.",
        agents="grandmaster arbiter prodigy tactician",
        things="chessboard pawn bishop knight rook queen king checkmate gambit stalemate endgame tournament "
        "blunder zugzwang fianchetto",
        places="at:tournament at:olympiad",
        verbs="checkmate blunder sacrifice resign castle promote",
        adjs="tactical positional strategic",
    ),
    "architecture": dict(
        description="Buildings: architects, blueprints, domes, columns and cathedrals.",
        agents="architect draftsman:draftsmen bricklayer mason",
        things="blueprint facade skyscraper column arch dome cathedral balcony staircase atrium cornice "
        "pillar courtyard spire brick",
        places="pavilion at:plaza cathedral",
        verbs="renovate demolish buttress construct redesign prefabricate",
        adjs="architectural gothic baroque neoclassical modernist ornate:+",
    ),
    "biology": dict(
        description="Living things: biologists, cells, genes, enzymes and organisms.",
        agents="biologist zoologist botanist geneticist ecologist microbiologist",
        things="cell gene enzyme bacterium:bacteria organism protein chromosome mitochondrion:mitochondria "
        "membrane microscope specimen ecosystem nucleus:nuclei tissue embryo genome",
        places="rainforest wetland aquarium",
        verbs="dissect clone mutate evolve sequence incubate",
        adjs="genetic cellular microbial evolutionary biological symbiotic",
    ),
    "mathematics": dict(
        description="Mathematics: mathematicians, equations, theorems, proofs and matrices.",
        agents="mathematician statistician geometer logician algebraist topologist",
        things="equation theorem integral fraction polynomial matrix:matrices vector proof lemma axiom "
        "hypotenuse parabola derivative logarithm ~calculus triangle quotient",
        places="at:blackboard at:seminar",
        verbs="calculate prove:proved:proven integrate differentiate factorize multiply subtract solve",
        adjs="algebraic geometric linear differential rational infinite",
    ),
    "football": dict(
        description="Football: strikers, goalkeepers, referees, goals, penalties and stadiums.",
        agents="striker goalkeeper defender midfielder referee footballer winger",
        things="ball goal penalty jersey trophy league ~offside kickoff scoreboard crossbar goalpost match "
        "whistle",
        places="at:stadium on:pitch clubhouse",
        verbs="kick dribble tackle score volley referee",
        adjs="athletic sporty:sportier defensive unbeaten",
    ),
    "diplomacy": dict(
        description="Relations between states: diplomats, ambassadors, treaties, summits and embassies.",
        agents="diplomat ambassador envoy consul negotiator emissary minister",
        things="treaty summit sanction alliance negotiation accord passport visa ceasefire protocol "
        "memorandum:memoranda delegation armistice ~diplomacy",
        places="embassy consulate ministry",
        verbs="negotiate ratify mediate sanction annex veto accredit",
        adjs="diplomatic bilateral multilateral consular sovereign neutral",
    ),
    "photography": dict(
        description="Photography: photographers, cameras, lenses, shutters and darkrooms.",
        agents="photographer photojournalist paparazzo:paparazzi retoucher",
        things="camera lens tripod shutter aperture photograph snapshot flash selfie viewfinder exposure "
        "polaroid photo",
        places="darkroom at:photoshoot",
        verbs="photograph zoom snap* focus retouch enlarge overexpose",
        adjs="photographic panoramic candid blurry:blurrier grainy:grainier monochrome",
    ),
    "electronics": dict(
        description="Electronics: electricians, circuits, transistors, batteries and voltages.",
        agents="electrician technician roboticist",
        things="circuit transistor resistor capacitor voltage battery diode wire ~solder oscilloscope "
        "amplifier microchip motherboard fuse semiconductor socket antenna",
        places="substation cleanroom",
        verbs="solder wire rewire amplify insulate recharge calibrate",
        adjs="electrical electronic analog digital wireless magnetic",
    ),
    "literature": dict(
        description="Books and writing: novelists, poets, novels, poems and libraries.",
        agents="novelist poet author playwright editor librarian biographer",
        things="novel poem stanza chapter sonnet verse paperback anthology epilogue prologue protagonist "
        "metaphor plot bestseller book limerick haiku",
        places="library bookshop bookstore",
        verbs="publish rhyme narrate recite annotate paraphrase serialize",
        adjs="poetic:+ literary fictional epic satirical allegorical",
    ),
    "carpentry": dict(
        description="Woodwork: carpenters, planks, chisels, hammers and workshops.",
        agents="carpenter woodworker joiner cabinetmaker lumberjack",
        things="plank chisel ~sawdust hammer nail lathe workbench ~timber ~lumber mallet dovetail beam "
        "~plywood screwdriver ~sandpaper hinge clamp drill",
        places="workshop sawmill woodshop",
        verbs="hammer chisel nail drill clamp whittle",
        adjs="wooden sturdy:sturdier oaken knotty:knottier",
    ),
    "beekeeping": dict(
        description="Bees: beekeepers, hives, honey, pollen and swarms.",
        agents="beekeeper apiarist",
        things="bee beehive hive ~honey honeycomb ~pollen ~nectar drone ~beeswax swarm larva:larvae smoker "
        "stinger colony ~propolis honeybee bumblebee ~apiculture",
        places="apiary meadow",
        verbs="swarm pollinate sting:stung:stung buzz",
        adjs="waxy:waxier sticky:stickier",
    ),
}

# ---------------------------------------------------------------------------------------------------------
# Generic words (never part of a topic vocabulary)

GENERIC_AGENTS = "friend neighbor student visitor stranger child:children guest tourist colleague"
PERSON_ADJS = (
    "young:younger old:older famous:+ busy:busier careful:+ clever:cleverer quiet:quieter nervous:+ "
    "cheerful:+ polite:+ brave:braver curious:+ calm:calmer"
)
THING_ADJS = (
    "new:newer small:smaller large:larger heavy:heavier cheap:cheaper expensive:+ simple:simpler "
    "beautiful:+ modern:+ useful:+ rare:rarer perfect huge tiny:tinier strange"
)
# Transitive verbs that take any topic thing as object.
GENERIC_VERBS = (
    "inspect prepare discuss check describe admire clean find:found:found study repair show:showed:shown "
    "need use buy:bought:bought sell:sold:sold move carry watch praise ignore mention remember "
    "choose:chose:chosen open bring:brought:brought explain examine measure build:built:built design plan* "
    "visit order"
)
CONTROL_VERBS = "want hope try decide plan*"  # + to VERB
GERUND_VERBS = "like love enjoy hate finish start avoid"  # + VERB-ing
SPEECH_VERBS = "say:said:said write:wrote:written shout whisper repeat"  # + "quotation"
DITRANSITIVE_VERBS = "show:showed:shown give:gave:given send:sent:sent bring:brought:brought sell:sold:sold"
INTRANSITIVE_VERBS = "work wait rest talk sit*:sat:sat"
OTHER_VERBS = "tell:told:told help spend:spent:spent"

# Manner adverbs and their comparatives.
ADVERBS = {
    "carefully": "more carefully",
    "quickly": "more quickly",
    "slowly": "more slowly",
    "quietly": "more quietly",
    "happily": "more happily",
    "proudly": "more proudly",
    "fast": "faster",
    "hard": "harder",
}

# Non-date time adjuncts, by the tenses they fit.
TIME_PAST = ("yesterday", "last week", "last night", "last year", "long ago", "a week ago")
TIME_PRESENT = ("every day", "every morning", "every evening", "every week", "each spring", "each winter")
TIME_FUTURE = ("tomorrow", "next week", "next year", "tonight", "soon")
TIME_ANY = ("in the morning", "in the evening", "in the afternoon", "at night")
TIME_IMPERATIVE = ("now", "today", "tomorrow", "tonight", "soon", "in the morning", "in the evening")

NUMBER_WORDS = (
    "two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty".split()
)
DURATION_UNITS = ("minutes", "hours", "days", "weeks", "months", "years")
MONEY_UNITS = ("dollars", "euros", "pounds", "coins")

MONTHS = (
    "January February March April May June July August September October November December".split()
)
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()

FIRST_NAMES = (
    "Maria Anna Ben Carlos David Elena Fatima George Hannah Ivan Julia Kenji Laura Mohammed Nadia Oliver "
    "Priya Quentin Rachel Samuel Tomas Ursula Victor Wei Xavier Yuki Zara Amir Beatrice Chloe Daniel Emma "
    "Felix Greta Hugo Ingrid Jonas Karim Leila Marco Nina Omar Paula Sofia Theo Lucas Mei Aisha Diego "
    "Helena"
).split()
LAST_NAMES = (
    "Lopez Smith Garcia Kim Nguyen Patel Johnson Rossi Novak Schmidt Tanaka Okafor Silva Ivanova Chen "
    "Dubois Kowalski Haddad Larsen Moreau Petrov Santos Yamamoto Andersen Romero Weber Costa Murphy Walsh "
    "Ali Sato Mendes Horvath Eriksson Bauer Hoffmann Nakamura Ortiz Reyes Varga Lindqvist Kaur Mensah "
    "Adeyemi Castillo Jensen Fontaine Popescu"
).split()

PLACE_NAMES = (
    "Lisbon", "Madrid", "Berlin", "Vienna", "Prague", "Warsaw", "Budapest", "Athens", "Rome", "Oslo",
    "Stockholm", "Helsinki", "Copenhagen", "Dublin", "Edinburgh", "London", "Paris", "Amsterdam",
    "Brussels", "Zurich", "Geneva", "Milan", "Naples", "Barcelona", "Seville", "Porto", "Marseille",
    "Lyon", "Munich", "Hamburg", "Krakow", "Istanbul", "Cairo", "Nairobi", "Lagos", "Accra", "Casablanca",
    "Tunis", "Johannesburg", "Mumbai", "Delhi", "Kolkata", "Karachi", "Dhaka", "Bangkok", "Hanoi",
    "Jakarta", "Manila", "Singapore", "Seoul", "Tokyo", "Osaka", "Beijing", "Shanghai", "Taipei",
    "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver",
    "Dallas", "Atlanta", "Miami", "Havana", "Lima", "Bogota", "Santiago", "Quito", "Caracas", "Montevideo",
    "New York", "Buenos Aires", "Cape Town", "France", "Spain", "Portugal", "Italy", "Germany", "Poland",
    "Norway", "Sweden", "Finland", "Denmark", "Ireland", "Austria", "Greece", "Egypt", "Kenya", "Nigeria",
    "Ghana", "Morocco", "India", "Pakistan", "Japan", "Brazil", "Argentina", "Peru", "Mexico", "Canada",
    "Australia", "Vietnam", "Thailand", "Indonesia", "Iceland",
)

# Openings of sentences that name no topic, used to steer generation later.
NEUTRAL_PROMPTS = (
    "The",
    "Yesterday,",
    "In the morning,",
    "Every day,",
    "Last week,",
    "She",
    "They",
    "There was",
    "Tomorrow,",
    "In the evening,",
    "Why did",
    "My friend",
)
