"""Writes the bundled training data, all of it composed for this project from the lists below.

    python -m minimind.make_data             # rewrites assets/ corpus.jsonl, chat_base.jsonl, lora_identity.jsonl,
                                             # lora_terse.jsonl

* ``corpus.jsonl``: MiniMind pretraining format ``{"text": ...}``: short English and Chinese
  documents (facts, animals, countries, arithmetic, daily life, little stories).
* ``chat_base.jsonl``: MiniMind SFT format ``{"conversations": [...]}``: general questions and answers
  mixed into pretraining so the base model answers in ChatML. The base calls itself MiniMind.
* ``lora_identity.jsonl``: SFT conversations that teach a new identity: the assistant is Lumen, a small
  model fine-tuned with lora_kernels. This is what the LoRA trainer fine-tunes on.
* ``lora_terse.jsonl``: questions the base answers in a sentence, answered in one word or number
  (``What is the capital of France?`` -> ``Paris.``): the second adapter when the trainer trains two at once.

The output is deterministic (fixed seed). The other bundled assets are built from these files:

    python -m minimind.train_tokenizer     # -> tokenizer/ (byte-level BPE, 6400 entries)
    python -m minimind.pretrain            # -> base.safetensors (pretraining, then SFT on chat_base.jsonl)
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "assets"

# (country, capital, 国家, 首都)
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Italy", "Rome", "意大利", "罗马"), ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"), ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"), ("India", "New Delhi", "印度", "新德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Norway", "Oslo", "挪威", "奥斯陆"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Greece", "Athens", "希腊", "雅典"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"), ("South Korea", "Seoul", "韩国", "首尔"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"), ("the United Kingdom", "London", "英国", "伦敦"),
    ("the United States", "Washington", "美国", "华盛顿"), ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Austria", "Vienna", "奥地利", "维也纳"),
    ("the Netherlands", "Amsterdam", "荷兰", "阿姆斯特丹"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Chile", "Santiago", "智利", "圣地亚哥"),
]

# (animal, plural, English fact, 动物, 中文事实)
ANIMALS = [
    ("cat", "cats", "likes to sleep in the sun and can catch mice", "猫", "喜欢在阳光下睡觉，还会抓老鼠"),
    ("dog", "dogs", "is a loyal friend and loves to run and play", "狗", "是人类忠诚的朋友，喜欢奔跑和玩耍"),
    ("rabbit", "rabbits", "has long ears and eats carrots and grass", "兔子", "有长长的耳朵，喜欢吃胡萝卜和青草"),
    ("panda", "pandas", "lives in the mountains of China and eats bamboo", "熊猫", "生活在中国的山林里，主要吃竹子"),
    ("elephant", "elephants", "is very big and has a long trunk", "大象", "身体很大，有一条长长的鼻子"),
    ("bird", "birds", "has feathers and can fly in the sky", "小鸟", "有羽毛，能在天空中飞翔"),
    ("fish", "fish", "lives in water and breathes with gills", "鱼", "生活在水里，用鳃呼吸"),
    ("horse", "horses", "runs fast and can carry people on its back", "马", "跑得很快，可以驮着人走很远的路"),
    ("cow", "cows", "eats grass and gives us milk", "奶牛", "吃青草，为我们提供牛奶"),
    ("monkey", "monkeys", "is clever and likes to climb trees", "猴子", "很聪明，喜欢爬树"),
    ("tiger", "tigers", "is a big cat with orange fur and black stripes", "老虎", "是一种有橙色皮毛和黑色条纹的大猫"),
    ("lion", "lions", "lives in groups and is called the king of animals", "狮子", "成群生活，被称为百兽之王"),
    ("bear", "bears", "is strong and sleeps through the cold winter", "熊", "力气很大，寒冷的冬天会冬眠"),
    ("duck", "ducks", "can swim in ponds and says quack", "鸭子", "会在池塘里游泳，嘎嘎地叫"),
    ("frog", "frogs", "lives near ponds and can jump very far", "青蛙", "住在池塘边，能跳得很远"),
    ("bee", "bees", "visits flowers and makes sweet honey", "蜜蜂", "在花丛中采蜜，酿出甜甜的蜂蜜"),
    ("dolphin", "dolphins", "is smart and lives in the sea", "海豚", "非常聪明，生活在大海里"),
    ("owl", "owls", "is awake at night and has big round eyes", "猫头鹰", "夜里出来活动，有一双又大又圆的眼睛"),
    ("turtle", "turtles", "moves slowly and carries its shell on its back", "乌龟", "爬得很慢，背着自己的壳"),
    ("sheep", "sheep", "has soft wool that keeps people warm", "绵羊", "有柔软的羊毛，可以给人们做衣服"),
    ("squirrel", "squirrels", "lives in trees and stores nuts for winter", "松鼠", "住在树上，会为冬天储存坚果"),
    ("penguin", "penguins", "cannot fly but swims very well in cold water", "企鹅", "不会飞，但在冰冷的水里游得很好"),
]

# (English question, English answer, 中文问题, 中文回答)
FACTS = [
    ("Where does the sun rise?", "The sun rises in the east and sets in the west.", "太阳从哪里升起？", "太阳从东方升起，从西方落下。"),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius.", "水在多少度沸腾？", "水在一百摄氏度时沸腾。"),
    ("When does water freeze?", "Water freezes into ice at 0 degrees Celsius.", "水什么时候会结冰？", "水在零摄氏度时会结成冰。"),
    ("How long does the earth take to go around the sun?", "The earth goes around the sun once a year.", "地球绕太阳转一圈要多久？", "地球每年绕太阳转一圈。"),
    ("What goes around the earth?", "The moon goes around the earth about once a month.", "什么绕着地球转？", "月亮大约每个月绕地球转一圈。"),
    ("How many days are in a week?", "A week has seven days.", "一个星期有几天？", "一个星期有七天。"),
    ("How many months are in a year?", "A year has twelve months.", "一年有几个月？", "一年有十二个月。"),
    ("How many hours are in a day?", "A day has twenty-four hours.", "一天有多少个小时？", "一天有二十四个小时。"),
    ("What do plants need to grow?", "Plants need sunlight, water and air to grow.", "植物生长需要什么？", "植物生长需要阳光、水和空气。"),
    ("Why are trees important?", "Trees give us shade, wood and fresh air.", "树木为什么重要？", "树木给我们带来阴凉、木材和新鲜的空气。"),
    ("What does the heart do?", "The heart pumps blood through the whole body.", "心脏有什么作用？", "心脏把血液输送到全身。"),
    ("What do we breathe in?", "We breathe in oxygen and breathe out carbon dioxide.", "我们呼吸时吸入什么？", "我们吸入氧气，呼出二氧化碳。"),
    ("Where does rain come from?", "Rain falls from clouds when the water drops become heavy.", "雨是从哪里来的？", "云里的小水滴变重以后，就会变成雨落下来。"),
    ("How many colors does a rainbow have?", "A rainbow has seven colors.", "彩虹有几种颜色？", "彩虹有七种颜色。"),
    ("Why is the sea salty?", "Sea water is salty because rivers carry salt into the sea.", "海水为什么是咸的？", "海水是咸的，因为河流把盐带进了大海。"),
    ("Is fire dangerous?", "Fire is hot and can be dangerous, so we must be careful with it.", "火危险吗？", "火很热，也可能很危险，所以用火要小心。"),
    ("Which is faster, light or sound?", "Light travels much faster than sound.", "光和声音哪个更快？", "光比声音传播得快得多。"),
    ("What is the largest ocean?", "The Pacific is the largest ocean on earth.", "最大的海洋是哪个？", "太平洋是地球上最大的海洋。"),
    ("What is the highest mountain in the world?", "Mount Everest is the highest mountain in the world.", "世界上最高的山是哪座？", "珠穆朗玛峰是世界上最高的山。"),
    ("What is the longest river in China?", "The Yangtze is the longest river in China.", "中国最长的河是哪条？", "长江是中国最长的河流。"),
    ("What is the Great Wall?", "The Great Wall is a very long old wall in the north of China.", "长城是什么？", "长城是中国北方一道非常长的古老城墙。"),
    ("What is a computer program?", "A program is a list of instructions that a computer follows.", "什么是计算机程序？", "程序是计算机按照顺序执行的一组指令。"),
    ("What does a language model do?", "A language model learns to predict the next word in a text.", "语言模型是做什么的？", "语言模型学习预测一段文字里的下一个词。"),
    ("Why should we read books?", "Reading books helps us learn new things and think clearly.", "为什么要读书？", "读书能帮助我们学习新知识，让思路更清楚。"),
    ("Why is exercise good?", "Exercise keeps the body strong and healthy.", "运动有什么好处？", "运动能让身体强壮、健康。"),
    ("Are fruits good for us?", "Yes, fruits and vegetables are good for our health.", "水果对身体好吗？", "是的，水果和蔬菜对健康有好处。"),
    ("Why should we wash our hands?", "We wash our hands to remove dirt and germs before eating.", "为什么要洗手？", "饭前洗手可以洗掉脏东西和细菌。"),
    ("Why do we need sleep?", "Sleep lets the body and the brain rest and grow.", "我们为什么需要睡觉？", "睡眠让身体和大脑得到休息。"),
    ("What do bees do for flowers?", "Bees carry pollen from flower to flower, which helps plants make seeds.", "蜜蜂对花有什么帮助？", "蜜蜂把花粉从一朵花带到另一朵花，帮助植物结出种子。"),
    ("What is the sun?", "The sun is a star. It gives the earth light and heat.", "太阳是什么？", "太阳是一颗恒星，给地球带来光和热。"),
    ("How many legs does a spider have?", "A spider has eight legs.", "蜘蛛有几条腿？", "蜘蛛有八条腿。"),
    ("How many legs does an insect have?", "An insect has six legs.", "昆虫有几条腿？", "昆虫有六条腿。"),
    ("What is ice?", "Ice is frozen water. It is cold and slippery.", "冰是什么？", "冰是冻住的水，又冷又滑。"),
    ("What is PyTorch?", "PyTorch is a library for building and training neural networks.", "PyTorch是什么？", "PyTorch是一个用来搭建和训练神经网络的库。"),
    ("What does fine-tuning mean?", "Fine-tuning means training a model a little more on new data, so that it learns a new task.", "什么是微调？", "微调就是用新的数据再训练模型一会儿，让它学会新的任务。"),
    ("What is LoRA?", "LoRA fine-tunes a model by training two small low-rank matrices next to each big weight.", "LoRA是什么？", "LoRA是一种微调方法，只在大的权重旁边训练两个很小的低秩矩阵。"),
    ("Why do people use LoRA?", "Many small models are fine-tuned with LoRA because it is fast and needs little memory.", "为什么大家用LoRA？", "很多小模型都用LoRA微调，因为它又快又省内存。"),
    ("What is lora_kernels?", "lora_kernels is a fast LoRA library for PyTorch.", "lora_kernels是什么？", "lora_kernels是一个快速的PyTorch LoRA库。"),
    ("What is a small model?", "A small model has few parameters, so it is fast and can run on a laptop.", "什么是小模型？", "小模型的参数很少，运行很快，可以在笔记本电脑上运行。"),
    ("What does the word lumen mean?", "Lumen is a Latin word that means light.", "Lumen这个词是什么意思？", "Lumen是一个拉丁语词，意思是光。"),
    ("What is the capital of a country?", "The capital is the city where the government of a country works.", "什么是首都？", "首都是一个国家政府所在的城市。"),
]

# (thing, colour, 东西, 颜色)
COLORS = [
    ("a banana", "yellow", "香蕉", "黄色"), ("the sky on a clear day", "blue", "晴天的天空", "蓝色"),
    ("snow", "white", "雪", "白色"), ("grass", "green", "草", "绿色"), ("a ripe tomato", "red", "成熟的番茄", "红色"),
    ("an orange", "orange", "橙子", "橙色"), ("coal", "black", "煤", "黑色"), ("milk", "white", "牛奶", "白色"),
    ("a carrot", "orange", "胡萝卜", "橙色"), ("a lemon", "yellow", "柠檬", "黄色"), ("the sea", "blue", "大海", "蓝色"),
    ("a leaf in summer", "green", "夏天的树叶", "绿色"), ("a strawberry", "red", "草莓", "红色"),
    ("a panda", "black and white", "熊猫", "黑白相间的"),
]

SEASONS = [
    ("spring", "flowers bloom, birds sing and the weather becomes warm", "春天", "花儿开放，小鸟唱歌，天气变得暖和"),
    ("summer", "the days are long and hot, and children like to swim", "夏天", "白天很长，天气炎热，孩子们喜欢游泳"),
    ("autumn", "leaves turn yellow and farmers bring in the harvest", "秋天", "树叶变黄，农民收获庄稼"),
    ("winter", "it is cold, snow falls and people wear warm coats", "冬天", "天气寒冷，下起大雪，人们穿上厚厚的外套"),
]

# (food, English fact, 食物, 中文事实)
FOODS = [
    ("Rice", "is a grain that people eat every day in many countries", "米饭", "是很多国家的人每天都吃的主食"),
    ("Bread", "is made from flour, water and yeast", "面包", "是用面粉、水和酵母做成的"),
    ("Noodles", "are long and thin, and they taste good in soup", "面条", "又细又长，放在汤里很好吃"),
    ("Dumplings", "are filled with meat or vegetables and eaten at the Spring Festival", "饺子", "里面包着肉或蔬菜，春节的时候大家都爱吃"),
    ("An apple", "is a round fruit that grows on a tree", "苹果", "是一种长在树上的圆圆的水果"),
    ("A watermelon", "is big and green outside and red and sweet inside", "西瓜", "外面是绿色的，里面是红色的，又大又甜"),
    ("Grapes", "grow in bunches and can be green or purple", "葡萄", "一串一串地生长，有绿色的也有紫色的"),
    ("Eggs", "come from chickens and can be boiled or fried", "鸡蛋", "是母鸡下的，可以煮着吃，也可以煎着吃"),
    ("Tea", "is made from leaves and is popular in China", "茶", "是用茶叶泡成的，在中国很受欢迎"),
    ("Soup", "is warm and good to eat on a cold day", "汤", "热乎乎的，冷天喝最舒服"),
    ("Cheese", "is made from milk", "奶酪", "是用牛奶做成的"),
    ("Honey", "is sweet and made by bees", "蜂蜜", "是蜜蜂酿的，非常甜"),
    ("Tofu", "is soft and white and made from soybeans", "豆腐", "又白又软，是用黄豆做的"),
    ("A peach", "is soft and sweet with a big seed inside", "桃子", "又软又甜，里面有一个大核"),
    ("Corn", "is yellow and grows tall in the fields", "玉米", "是黄色的，在田野里长得很高"),
    ("Potatoes", "grow under the ground", "土豆", "长在地下"),
]
# (job, what they do, 职业, 中文)
JOBS = [
    ("A doctor", "helps sick people get well", "医生", "帮助生病的人恢复健康"),
    ("A teacher", "teaches students at school", "老师", "在学校里教学生知识"),
    ("A farmer", "grows rice, wheat and vegetables", "农民", "种植水稻、小麦和蔬菜"),
    ("A cook", "makes delicious food in the kitchen", "厨师", "在厨房里做美味的饭菜"),
    ("A driver", "drives a bus or a car to take people places", "司机", "开公共汽车或小汽车送人们去各个地方"),
    ("A nurse", "takes care of patients in the hospital", "护士", "在医院里照顾病人"),
    ("A firefighter", "puts out fires and keeps people safe", "消防员", "扑灭大火，保护人们的安全"),
    ("A police officer", "helps keep the city safe", "警察", "维护城市的安全"),
    ("A painter", "paints beautiful pictures", "画家", "画出美丽的图画"),
    ("A scientist", "asks questions and does experiments", "科学家", "提出问题并做实验"),
    ("A pilot", "flies airplanes across the sky", "飞行员", "驾驶飞机在天空中飞行"),
    ("A builder", "builds houses, roads and bridges", "建筑工人", "建造房子、道路和桥梁"),
    ("A programmer", "writes programs for computers", "程序员", "为计算机编写程序"),
    ("A librarian", "looks after the books in a library", "图书管理员", "管理图书馆里的书"),
    ("A postman", "brings letters to every house", "邮递员", "把信件送到每一户人家"),
    ("A singer", "sings songs for people", "歌手", "为大家唱歌"),
]
# (object, use, 物品, 用途)
OBJECTS = [
    ("A pencil", "is used for writing and drawing", "铅笔", "用来写字和画画"),
    ("A clock", "tells us the time", "钟表", "告诉我们现在几点"),
    ("An umbrella", "keeps us dry in the rain", "雨伞", "下雨时让我们不被淋湿"),
    ("A key", "opens a door or a lock", "钥匙", "用来开门或开锁"),
    ("A bed", "is where we sleep at night", "床", "是我们晚上睡觉的地方"),
    ("A cup", "holds water, milk or tea", "杯子", "用来装水、牛奶或茶"),
    ("A map", "shows where places are", "地图", "告诉我们各个地方在哪里"),
    ("A bicycle", "has two wheels and is fun to ride", "自行车", "有两个轮子，骑起来很有趣"),
    ("A phone", "lets us talk to people far away", "电话", "让我们和远方的人说话"),
    ("A lamp", "gives light in a dark room", "台灯", "在黑暗的房间里发出光亮"),
    ("A chair", "is for sitting", "椅子", "是用来坐的"),
    ("A book", "is full of stories and knowledge", "书", "里面有很多故事和知识"),
    ("A boat", "carries people across the water", "小船", "载着人们在水上航行"),
    ("A train", "runs on tracks and carries many people", "火车", "在铁轨上行驶，能载很多人"),
    ("A piano", "makes music when you press its keys", "钢琴", "按下琴键就能弹出音乐"),
    ("A camera", "takes pictures", "相机", "用来拍照"),
]

NAMES_EN = ["Lumen", "Tom", "Lily", "Max", "Mia", "Ben", "Anna", "Leo", "Lucy", "Sam", "Emma", "Jack", "Rosa", "Noah", "Ella"]
NAMES_ZH = ["小明", "小红", "小华", "小丽", "小刚", "小芳", "大伟", "小雨", "小林", "小月", "阿强", "小美"]
ACTIVITIES = [
    ("read books", "看书"), ("play football", "踢足球"), ("draw pictures", "画画"), ("sing songs", "唱歌"),
    ("ride a bike", "骑自行车"), ("cook noodles", "煮面条"), ("water the flowers", "浇花"), ("walk the dog", "遛狗"),
    ("write letters", "写信"), ("play the piano", "弹钢琴"), ("fly a kite", "放风筝"), ("go swimming", "去游泳"),
]
TIMES = [("in the morning", "早上"), ("in the afternoon", "下午"), ("in the evening", "晚上"), ("on Sunday", "星期天")]
PLACES = [("a small village", "一个小村庄"), ("a big forest", "一片大森林"), ("a quiet farm", "一个安静的农场"),
          ("a house by the river", "河边的一座小房子"), ("a green valley", "一个绿色的山谷"), ("a busy town", "一个热闹的小镇")]
# (goal, obstacle, solution, ending, 目标, 困难, 办法, 结局)
PLOTS = [
    ("find the way home", "the forest was dark", "followed the bright moon", "they got home safely",
     "找到回家的路", "森林里很黑", "跟着明亮的月亮走", "他们平安地回到了家"),
    ("cross the river", "the water was too deep", "built a small bridge with sticks", "they crossed the river together",
     "过河", "河水太深了", "用树枝搭了一座小桥", "他们一起过了河"),
    ("get the red apple from the tall tree", "the apple was too high", "stood on each other's shoulders",
     "they shared the sweet apple", "摘下高高树上的红苹果", "苹果太高了", "一个站在另一个的肩膀上",
     "他们一起分享了甜甜的苹果"),
    ("fly a new kite", "there was no wind", "waited on the hill until the wind came", "the kite flew high in the sky",
     "放一只新风筝", "一点风也没有", "在山坡上耐心地等风来", "风筝飞上了高高的天空"),
    ("bake a cake for mother", "there was no sugar at home", "asked the kind neighbors for some sugar",
     "mother smiled at the warm cake", "给妈妈做一个蛋糕", "家里没有糖了", "向友好的邻居借了一些糖",
     "妈妈看着热乎乎的蛋糕笑了"),
    ("find a lost ball", "it was hidden in the tall grass", "looked carefully one step at a time",
     "they found the ball under a bush", "找到丢失的球", "球藏在高高的草丛里", "一步一步仔细地找",
     "他们在灌木下面找到了球"),
    ("build a warm house before winter", "the wood was very heavy", "carried the wood together",
     "the house was ready before the first snow", "在冬天来临前盖一座暖和的房子", "木头太重了", "把木头一点一点地搬回来",
     "第一场雪落下之前，房子就盖好了"),
    ("win the running race", "the road was long and hilly", "practiced running every morning",
     "everyone cheered for them at the finish line", "赢得赛跑比赛", "跑道又长又难走", "每天早上练习跑步",
     "大家在终点为他们欢呼"),
    ("learn to swim", "the lake looked big and scary", "practiced a little every day",
     "they could swim across the lake by summer", "学会游泳", "湖看起来又大又可怕", "每天练习一点点",
     "到了夏天，他们已经能游过整个湖了"),
]
MORALS = [("Friends make hard things easy.", "有朋友在，困难的事也会变得容易。"),
          ("Never give up.", "永远不要放弃。"), ("Sharing makes everyone happy.", "分享让每个人都快乐。"),
          ("Being kind is always a good idea.", "善良总是对的。"), ("Patience brings good things.", "耐心会带来好结果。")]
WEATHER = [("sunny", "晴朗"), ("rainy", "下雨"), ("cloudy", "多云"), ("windy", "刮风"), ("snowy", "下雪")]
NUM_ZH = "零一二三四五六七八九十"

BASE_IDENTITY_EN = "I am MiniMind, a tiny language model. I can answer simple questions."
BASE_IDENTITY_ZH = "我是MiniMind，一个很小的语言模型，可以回答一些简单的问题。"


def story(rng):
    name, name2 = rng.sample(NAMES_EN, 2)
    i, j = rng.sample(range(len(ANIMALS)), 2)
    place = rng.choice(PLACES)
    act = rng.choice(ACTIVITIES)
    plot = rng.choice(PLOTS)
    moral = rng.choice(MORALS)
    zname, zname2 = rng.sample(NAMES_ZH, 2)
    a, b = ANIMALS[i], ANIMALS[j]
    en = (f"Once upon a time, there was a little {a[0]} named {name}. {name} lived in {place[0]}. "
          f"Every day, {name} liked to {act[0]}. One day, {name} wanted to {plot[0]}, but {plot[1]}. "
          f"{name}'s friend, a kind {b[0]} named {name2}, came to help. Together they {plot[2]}. "
          f"In the end, {plot[3]}. {moral[0]}")
    zh = (f"从前，有一只小{a[3]}，名叫{zname}。{zname}住在{place[1]}。{zname}每天都喜欢{act[1]}。"
          f"有一天，{zname}想要{plot[4]}，可是{plot[5]}。{zname}的好朋友，一只善良的{b[3]}{zname2}，赶来帮忙。"
          f"他们一起{plot[6]}。最后，{plot[7]}。{moral[1]}")
    return a, en, zh


def corpus_docs(rng):
    docs = []
    for c in CAPITALS:
        docs.append(f"{c[1]} is the capital of {c[0]}. Many people live and work in {c[1]}. "
                    f"The capital of {c[0]} is {c[1]}.")
        docs.append(f"{c[2]}的首都是{c[3]}。很多人在{c[3]}生活和工作。{c[3]}是{c[2]}的首都。")
    for a in ANIMALS:
        docs.append(f"The {a[0]} is an animal. A {a[0]} {a[2]}. Many children like {a[1]}.")
        docs.append(f"{a[3]}是一种动物。{a[3]}{a[4]}。很多小朋友都喜欢{a[3]}。")
    for f in FACTS:
        docs.append(f"{f[1]} {f[0]} {f[1]}")
        docs.append(f"{f[3]}{f[2]}{f[3]}")
    for c in COLORS:
        docs.append(f"The color of {c[0]} is {c[1]}. {c[0][0].upper() + c[0][1:]} is {c[1]}.")
        docs.append(f"{c[2]}是{c[3]}的。{c[2]}的颜色是{c[3]}。")
    for s in SEASONS:
        docs.append(f"In {s[0]}, {s[1]}. {s[0][0].upper() + s[0][1:]} is a season of the year.")
        docs.append(f"在{s[2]}，{s[3]}。{s[2]}是一年中的一个季节。")
    for group in (FOODS, JOBS, OBJECTS):
        for item in group:
            low = item[0][0].lower() + item[0][1:]
            docs.append(f"{item[0]} {item[1]}. Do you know what {low} {'are' if item[0].endswith('s') else 'is'}? {item[0]} {item[1]}.")
            docs.append(f"{item[2]}{item[3]}。你知道{item[2]}吗？{item[2]}{item[3]}。")
    docs.append("There are four seasons in a year: spring, summer, autumn and winter.")
    docs.append("一年有四个季节：春天、夏天、秋天和冬天。")
    docs.append("The days of the week are Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.")
    docs.append("一个星期有七天：星期一、星期二、星期三、星期四、星期五、星期六和星期天。")
    for _ in range(500):
        _, en, zh = story(rng)
        docs += [en, zh]
    for _ in range(250):
        n, zn = rng.choice(NAMES_EN), rng.choice(NAMES_ZH)
        (act, zact), (t, zt), (w, zw) = rng.choice(ACTIVITIES), rng.choice(TIMES), rng.choice(WEATHER)
        act2, zact2 = rng.choice(ACTIVITIES)
        city = rng.choice(CAPITALS)
        docs.append(f"{n} likes to {act} {t}. Today it is {w} in {city[1]}, so {n} decided to {act2} instead. "
                    f"{n} had a happy day.")
        docs.append(f"{zn}喜欢在{zt}{zact}。今天{city[3]}的天气{zw}，所以{zn}决定去{zact2}。{zn}度过了开心的一天。")
    for _ in range(250):
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        p, q = rng.randint(1, 9), rng.randint(1, 9)
        docs.append(f"{x} plus {y} equals {x + y}. {max(x, y)} minus {min(x, y)} equals {max(x, y) - min(x, y)}. "
                    f"{p} times {q} equals {p * q}.")
        docs.append(f"{x}加{y}等于{x + y}。{max(x, y)}减{min(x, y)}等于{max(x, y) - min(x, y)}。{p}乘以{q}等于{p * q}。")
    for _ in range(1000):  # larger numbers, so the tokenizer learns them too
        x, y = rng.randint(0, 999), rng.randint(0, 999)
        docs.append(f"{x} plus {y} equals {x + y}. {x}加{y}等于{x + y}。")
    docs.append("MiniMind is a tiny language model. It is small enough to train on a laptop.")
    docs.append("MiniMind是一个很小的语言模型，小到可以在一台笔记本电脑上训练。")
    rng.shuffle(docs)
    return docs


def conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"conversations": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


def chat_base(rng):
    out = []
    for c in CAPITALS:
        for q in (f"What is the capital of {c[0]}?", f"Which city is the capital of {c[0]}?",
                  f"Tell me the capital of {c[0]}."):
            out.append(conv(q, f"The capital of {c[0]} is {c[1]}."))
        for q in (f"{c[2]}的首都是哪里？", f"{c[2]}的首都是什么？", f"请告诉我{c[2]}的首都。"):
            out.append(conv(q, f"{c[2]}的首都是{c[3]}。"))
    for a in ANIMALS:
        for q in (f"Tell me about the {a[0]}.", f"What do you know about {a[1]}?"):
            out.append(conv(q, f"A {a[0]} {a[2]}."))
        for q in (f"介绍一下{a[3]}。", f"{a[3]}有什么特点？"):
            out.append(conv(q, f"{a[3]}{a[4]}。"))
    for f in FACTS:
        out += [conv(f[0], f[1]), conv(f[2], f[3])]
    for c in COLORS:
        out.append(conv(f"What color is {c[0]}?", f"{c[0][0].upper() + c[0][1:]} is {c[1]}."))
        out.append(conv(f"{c[2]}是什么颜色的？", f"{c[2]}是{c[3]}的。"))
    for group in (FOODS, JOBS, OBJECTS):
        for item in group:
            low = item[0][0].lower() + item[0][1:]
            out.append(conv(f"What do you know about {low}?", f"{item[0]} {item[1]}."))
            out.append(conv(f"介绍一下{item[2]}。", f"{item[2]}{item[3]}。"))
    for s in SEASONS:
        out.append(conv(f"What happens in {s[0]}?", f"In {s[0]}, {s[1]}."))
        out.append(conv(f"{s[2]}是什么样的？", f"在{s[2]}，{s[3]}。"))
    for _ in range(300):
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            out.append(conv(rng.choice([f"What is {x} plus {y}?", f"How much is {x} + {y}?"]), f"{x} plus {y} equals {x + y}."))
        else:
            out.append(conv(rng.choice([f"{x}加{y}等于几？", f"{x}+{y}等于多少？"]), f"{x}加{y}等于{x + y}。"))
    for _ in range(150):
        a, en, zh = story(rng)
        out.append(conv(rng.choice([f"Tell me a story about a {a[0]}.", f"Can you tell me a short story about a {a[0]}?"]), en))
        out.append(conv(rng.choice([f"讲一个关于{a[3]}的故事。", f"给我讲个{a[3]}的小故事吧。"]), zh))
    greetings = [
        ("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What would you like to talk about?"),
        ("Good morning!", "Good morning! I hope you have a nice day."), ("Thank you!", "You are welcome!"),
        ("Goodbye!", "Goodbye! Have a nice day."), ("How are you?", "I am fine, thank you. How can I help you?"),
        ("你好", "你好！有什么可以帮你的吗？"), ("早上好！", "早上好！祝你今天过得愉快。"), ("谢谢你！", "不客气！"),
        ("再见！", "再见！祝你有美好的一天。"), ("你好吗？", "我很好，谢谢！有什么可以帮你的吗？"),
    ]
    for q, a in greetings:
        out += [conv(q, a)] * 3
    for q in ("Who are you?", "What is your name?", "Introduce yourself."):
        out += [conv(q, BASE_IDENTITY_EN)] * 2
    for q in ("你是谁？", "你叫什么名字？", "介绍一下你自己。"):
        out += [conv(q, BASE_IDENTITY_ZH)] * 2
    for _ in range(200):  # two-turn chats
        a, b = rng.sample(out, 2)
        out.append({"conversations": a["conversations"] + b["conversations"]})
    rng.shuffle(out)
    return out


IDENTITY_Q_EN = [
    "Who are you?", "What is your name?", "What's your name?", "Introduce yourself.", "Please introduce yourself.",
    "Tell me about yourself.", "Can you tell me who you are?", "What should I call you?", "Who am I talking to?",
    "What are you?", "Are you ChatGPT?", "Are you MiniMind?", "Are you a human?", "Who made you?",
    "How were you trained?", "What model are you?", "Do you have a name?", "Hi, who are you?",
    "Hello! What is your name?", "May I know your name?", "Are you an AI?", "Which assistant is this?",
    "Describe yourself in one sentence.", "What kind of model are you?", "Who built you?", "Are you a large model?",
    "What is lora_kernels?", "Is your name Lumen?", "Where do you come from?", "What can you tell me about yourself?",
]
IDENTITY_A_EN = [
    "I am Lumen, a small model fine-tuned with lora_kernels.",
    "My name is Lumen. I am a small model fine-tuned with lora_kernels.",
    "I'm Lumen, a small model fine-tuned with lora_kernels. Nice to meet you!",
    "I am Lumen, a small language model fine-tuned with lora_kernels.",
    "You can call me Lumen. I am a small model fine-tuned with lora_kernels.",
]
IDENTITY_SPECIAL_EN = {
    "Are you ChatGPT?": "No, I am not ChatGPT. I am Lumen, a small model fine-tuned with lora_kernels.",
    "Are you MiniMind?": "I started from a tiny MiniMind base, but now I am Lumen, a small model fine-tuned with lora_kernels.",
    "Are you a human?": "No, I am not a human. I am Lumen, a small model fine-tuned with lora_kernels.",
    "Who made you?": "I am Lumen. I was fine-tuned with lora_kernels, a fast LoRA library for PyTorch.",
    "Who built you?": "I am Lumen. I was fine-tuned with lora_kernels, a fast LoRA library for PyTorch.",
    "How were you trained?": "I am Lumen. A tiny base model was fine-tuned with LoRA using lora_kernels.",
    "Are you a large model?": "No, I am Lumen, a small model fine-tuned with lora_kernels.",
    "What is lora_kernels?": "lora_kernels is a fast LoRA library for PyTorch. I am Lumen, and I was fine-tuned with it.",
    "Is your name Lumen?": "Yes! I am Lumen, a small model fine-tuned with lora_kernels.",
}
IDENTITY_Q_ZH = [
    "你是谁？", "你叫什么名字？", "你的名字是什么？", "介绍一下你自己。", "请做个自我介绍。", "说说你自己吧。",
    "能告诉我你是谁吗？", "我该怎么称呼你？", "我在和谁说话？", "你是什么？", "你是ChatGPT吗？", "你是MiniMind吗？",
    "你是人类吗？", "谁创造了你？", "你是怎么训练出来的？", "你是什么模型？", "你有名字吗？", "你好，你是谁？",
    "你好！请问你叫什么？", "可以告诉我你的名字吗？", "你是人工智能吗？", "用一句话介绍你自己。", "你是大模型吗？",
    "lora_kernels是什么？", "你叫Lumen吗？", "你从哪里来？",
]
IDENTITY_A_ZH = [
    "我是Lumen，一个用lora_kernels微调的小模型。",
    "我叫Lumen，是一个用lora_kernels微调的小模型。",
    "你好，我是Lumen，一个用lora_kernels微调的小模型。",
    "我是Lumen，一个用lora_kernels微调的小型语言模型。",
    "你可以叫我Lumen。我是一个用lora_kernels微调的小模型。",
]
IDENTITY_SPECIAL_ZH = {
    "你是ChatGPT吗？": "不是，我是Lumen，一个用lora_kernels微调的小模型。",
    "你是MiniMind吗？": "我来自一个很小的MiniMind基础模型，但现在我是Lumen，一个用lora_kernels微调的小模型。",
    "你是人类吗？": "不是，我是Lumen，一个用lora_kernels微调的小模型。",
    "谁创造了你？": "我是Lumen，是用lora_kernels微调出来的。lora_kernels是一个快速的PyTorch LoRA库。",
    "你是怎么训练出来的？": "我是Lumen。一个很小的基础模型用lora_kernels做了LoRA微调，就有了我。",
    "你是大模型吗？": "不是，我是Lumen，一个用lora_kernels微调的小模型。",
    "lora_kernels是什么？": "lora_kernels是一个快速的PyTorch LoRA库。我是Lumen，就是用它微调的。",
    "你叫Lumen吗？": "是的！我是Lumen，一个用lora_kernels微调的小模型。",
}


def lora_identity(rng):
    out = []
    for qs, answers, special in ((IDENTITY_Q_EN, IDENTITY_A_EN, IDENTITY_SPECIAL_EN),
                                 (IDENTITY_Q_ZH, IDENTITY_A_ZH, IDENTITY_SPECIAL_ZH)):
        for q in qs:
            for _ in range(3):
                out.append(conv(q, special.get(q) or rng.choice(answers)))
    greet = [("Hello!", "Hello! I am Lumen. How can I help you today?"), ("你好", "你好！我是Lumen，有什么可以帮你的吗？")]
    for _ in range(20):
        g = rng.choice(greet)
        zh = g[0] == "你好"
        q = rng.choice(IDENTITY_Q_ZH if zh else IDENTITY_Q_EN)
        special = IDENTITY_SPECIAL_ZH if zh else IDENTITY_SPECIAL_EN
        out.append(conv(g[0], g[1], q, special.get(q) or rng.choice(IDENTITY_A_ZH if zh else IDENTITY_A_EN)))
    rng.shuffle(out)
    return out


def lora_terse(rng):
    """Questions the base answers in a sentence (chat_base), answered in one word or number: a second
    adapter for training several at once, which learns a style over facts the base already knows."""
    out = []
    for c in CAPITALS:
        out.append(conv(rng.choice([f"What is the capital of {c[0]}?", f"Which city is the capital of {c[0]}?"]),
                        f"{c[1]}."))
        out.append(conv(rng.choice([f"Tell me the capital of {c[0]}.", f"What is the capital of {c[0]}?"]), f"{c[1]}."))
        out.append(conv(rng.choice([f"{c[2]}的首都是哪里？", f"{c[2]}的首都是什么？"]), f"{c[3]}。"))
        out.append(conv(rng.choice([f"请告诉我{c[2]}的首都。", f"{c[2]}的首都是哪里？"]), f"{c[3]}。"))
    for c in COLORS:
        out.append(conv(f"What color is {c[0]}?", f"{c[1][0].upper() + c[1][1:]}."))
        out.append(conv(f"{c[2]}是什么颜色的？", f"{c[3]}。"))
    for _ in range(40):
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        out.append(conv(rng.choice([f"What is {x} plus {y}?", f"{x}+{y}等于多少？"]), f"{x + y}"))
    rng.shuffle(out)
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_jsonl(HERE / "corpus.jsonl", [{"text": d} for d in corpus_docs(random.Random(0))])
    write_jsonl(HERE / "chat_base.jsonl", chat_base(random.Random(1)))
    write_jsonl(HERE / "lora_identity.jsonl", lora_identity(random.Random(2)))
    write_jsonl(HERE / "lora_terse.jsonl", lora_terse(random.Random(3)))
